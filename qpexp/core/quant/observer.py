"""The running range of an activation quantizer (min/max or EMA) and the qparams derived from it.

:class:`RangeObserver` updates the range from each training batch and writes the scale and zero point
of the new range. It is a plain object, not an ``nn.Module`` (no submodule call in the forward path,
nothing added to the state dict): the range and qparams live in its quantizer's buffers
(``min_val``, ``max_val``, ``scale``, ``zero_point``, ``initialized``: state-dict keys), which each
method reads and writes through the quantizer it is given.

A per-tensor observer keeps Python copies of the range and qparams (:class:`ScalarRange`): a
training step reads the batch min/max (two scalar reads) and, when the running range grows, writes
only the buffers whose value changed, in float32 arithmetic identical to the tensor formulas (done on
Python floats rounded to float32: numpy scalars cost more). Whether the running range's own ends are
clamped is checked once per range, so a batch inside the range needs no check. On CPU (where qpexp
trains) a scalar read costs about a microsecond, far less than the dozen tiny tensor ops it replaces.
Loading a state dict or moving the module refreshes the copies (the quantizer calls
:meth:`RangeObserver.invalidate`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from qpexp.core.quant.qparams import affine_qparams, affine_qparams_scalar, batch_range, f32, inverse


class ScalarRange:
    """A per-tensor range and its qparams in Python numbers: ``lo``, ``hi`` (float32 values),
    ``scale``, ``zero``, ``inv`` (``1/S`` as the kernel takes it), ``inv_t`` and ``scale_t`` (``1/S``
    and ``S`` as 0-d float32 tensors: an in-place product by a 0-d tensor dispatches faster than by a
    Python number, same float32 product), ``code_min``/``code_max`` (``qmin - Z``, ``qmax - Z``: the
    unclamped codes ``rint(x (1/S))``) and ``inside`` (whether the codes of ``lo`` and ``hi`` are
    unclamped)."""

    __slots__ = ("lo", "hi", "scale", "zero", "inv", "inv_t", "scale_t", "code_min", "code_max", "inside")

    def __init__(self, lo: float, hi: float, scale: float, zero: int, qmin: int, qmax: int, old=None):
        """``old``: the range this one replaces, whose 0-d tensors are reused (no autograd graph holds
        them: see :func:`~qpexp.core.quant.linear.fake_quant_unclamped`)."""
        self.lo, self.hi, self.scale, self.zero = lo, hi, scale, zero
        self.inv = inv = inverse(scale)
        if old is None:
            self.inv_t = torch.tensor(inv, dtype=torch.float32)
            self.scale_t = torch.tensor(scale, dtype=torch.float32)
        else:
            self.inv_t, self.scale_t = old.inv_t, old.scale_t
            if scale != old.scale:
                self.inv_t.fill_(inv)
                self.scale_t.fill_(scale)
        self.code_min, self.code_max = qmin - zero, qmax - zero
        self.inside = self.codes_inside(lo, hi)

    def covers(self, lo: float, hi: float) -> bool:
        """Whether ``[lo, hi]`` lies in this range (False for a NaN)."""
        return self.lo <= lo and hi <= self.hi

    def codes_inside(self, lo: float, hi: float) -> bool:
        """Whether the codes ``rint(x (1/S))`` of ``lo`` and ``hi`` (float32 values) lie in
        ``[qmin - Z, qmax - Z]``: then so do those of every value between them, since a float32 product
        by a positive number rounds monotonically."""
        a, b = f32(lo * self.inv), f32(hi * self.inv)
        return math.isfinite(a + b) and self.code_min <= round(a) and round(b) <= self.code_max

    def unclamped(self, lo: float, hi: float) -> bool:
        """Whether no code of a batch whose min and max are ``lo`` and ``hi`` is clamped: a min/max
        range containing the batch bounds its codes by those of its own ends (checked once per range);
        an EMA range may not contain it, nor does any range a batch with a NaN (no comparison holds)."""
        return (self.inside and self.covers(lo, hi)) or self.codes_inside(lo, hi)


class RangeObserver:
    """The running min/max (``range="minmax"``) or the EMA of batch min/max (``range="ema"``: ``min <-
    decay min + (1 - decay) batch_min``, likewise max) of an activation quantizer, and the scale and
    zero point of that range. Every method takes the quantizer ``q`` whose buffers hold the state
    and whose attributes (``range``, ``decay``, ``bits``, ``symmetric``, ``qmin``, ``qmax``,
    ``per_channel``, ``ch_axis``) configure it; the observer itself holds only ``mirror``, the
    :class:`ScalarRange` copy of a per-tensor range (None until read or after :meth:`invalidate`)."""

    __slots__ = ("scalar", "mirror")

    def __init__(self, scalar: bool):
        """``scalar``: a per-tensor range, updated in Python numbers (:meth:`observe_scalar`)."""
        self.scalar = scalar
        self.mirror: ScalarRange | None = None

    def invalidate(self) -> None:
        """Forget the Python copy (the buffers changed: a state dict loaded, the module moved)."""
        self.mirror = None

    def current(self, q: nn.Module) -> ScalarRange:
        """The per-tensor range and qparams in Python numbers, read from the buffers if not yet known."""
        return self.mirror or self.refresh(q)

    def refresh(self, q: nn.Module) -> ScalarRange:
        """Read the per-tensor range and qparams from the buffers (four scalar reads)."""
        lo, hi, scale = (float(v) for v in (q.min_val, q.max_val, q.scale))
        self.mirror = ScalarRange(lo, hi, scale, int(q.zero_point), q.qmin, q.qmax, self.mirror)
        return self.mirror

    @torch.no_grad()
    def observe(self, q: nn.Module, x: torch.Tensor) -> None:
        """Update the range from the batch ``x`` (per channel or per tensor) and the qparams from it."""
        lo, hi = batch_range(x, q.ch_axis if q.per_channel else None)
        if self.scalar:
            self.observe_scalar(q, lo.item(), hi.item())
            return
        if q.range == "ema" and q.is_initialized():
            # min <- decay * min + (1 - decay) * batch_min (likewise max)
            q.min_val.mul_(q.decay).add_(lo * (1 - q.decay))
            q.max_val.mul_(q.decay).add_(hi * (1 - q.decay))
        elif q.range == "ema":
            q.min_val.copy_(lo)
            q.max_val.copy_(hi)
        else:
            torch.minimum(q.min_val, lo, out=q.min_val)
            torch.maximum(q.max_val, hi, out=q.max_val)
        scale, zero = affine_qparams(q.min_val, q.max_val, q.bits, q.symmetric)
        q.scale.copy_(scale)
        q.zero_point.copy_(zero)
        q._mark_initialized()

    def observe_scalar(self, q: nn.Module, lo: float, hi: float) -> ScalarRange:
        """The per-tensor update from a batch whose min and max are ``lo`` and ``hi``, in Python numbers
        (float32 arithmetic, the same numbers as the tensor path): when the range moves, a write to each
        buffer whose value changed (after a ReLU the minimum and zero point stay 0). Returns the new
        :class:`ScalarRange` (the current one when a min/max range did not grow)."""
        old = self.mirror  # set only while initialized
        if old is None and q.is_initialized():
            old = self.refresh(q)
        if old is not None and q.range != "ema" and old.covers(lo, hi):
            return old  # the running range did not grow: nothing changes
        new_lo, new_hi = _moved_range(q, old, lo, hi)
        scale, zero = affine_qparams_scalar(new_lo, new_hi, q.bits, q.symmetric)
        bufs = (q.min_val, q.max_val, q.scale, q.zero_point)
        olds = (None,) * 4 if old is None else (old.lo, old.hi, old.scale, old.zero)
        for buf, new, was in zip(bufs, (new_lo, new_hi, scale, zero), olds):
            if old is None or new != was:
                buf.fill_(new)
        q._mark_initialized()
        self.mirror = ScalarRange(new_lo, new_hi, scale, zero, q.qmin, q.qmax, old)
        return self.mirror


def _moved_range(q: nn.Module, old: ScalarRange | None, lo: float, hi: float) -> tuple[float, float]:
    """The running range after a batch ``[lo, hi]``: the batch's own on the first one, else the EMA in
    float32 (numpy scalars: the tensor path's products and sum) or the union."""
    if old is None:
        return lo, hi
    if q.range == "ema":
        d, e = np.float32(q.decay), np.float32(1 - q.decay)
        new_lo = float(np.float32(old.lo) * d + np.float32(lo) * e)
        return new_lo, float(np.float32(old.hi) * d + np.float32(hi) * e)
    return min(old.lo, lo), max(old.hi, hi)
