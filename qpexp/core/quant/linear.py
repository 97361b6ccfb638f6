"""Linear (affine) fake quantizer: ``r = S (q - Z)`` with the straight-through estimator.

The arithmetic is torch's fake-quantize kernel's, bit for bit: ``q = clamp(nearbyint(x * (1/S)) + Z,
qmin, qmax)``, ``x_hat = (q - Z) S``, gradient 1 where the unclamped ``q`` lies in ``[qmin, qmax]`` and
0 elsewhere. Tensors below ``FUSED_MAX_NUMEL`` elements (most weights) go through torch's fused
kernels (``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``); larger ones
(activations) through a vectorized chain of four ops (:func:`fake_quant`, :func:`fake_quant_scalar`),
because in torch 2.13 on CPU the fused kernel is a scalar loop, about 3x slower than the chain on a
50k-element activation. Tests check both paths against the textbook formula in numpy with ``atol=0``.

Where no code can be clamped, clamping and the straight-through mask change nothing, and a
quantizer takes the unclamped form (:func:`fake_quant_unclamped`: ``round(x (1/S)) S`` in place on a
clone, whose gradient is the identity, computed in C++): symmetric min/max weights never clamp (their
scale comes from their own ``max|w|``), and a per-tensor activation in training checks its batch's
min and max (which it reads anyway). It saves a Python backward per quantizer per step.

:class:`LinearQuantizer` composes one part per job, each a plain object or function (no submodule
in the forward path, no state-dict key of its own: every buffer and parameter stays the quantizer's):
the qparams arithmetic, tensor and float32-exact Python (:mod:`~qpexp.core.quant.qparams`), an
activation's running range with its Python copy of a per-tensor range and qparams
(:class:`~qpexp.core.quant.observer.RangeObserver`), the learned step size
(:class:`~qpexp.core.quant.lsq.LearnedStep`), and a weight's own range (:func:`symmetric_weight`,
:func:`~qpexp.core.quant.qparams.symmetric_scale`).

``python -m qpexp.bench qat`` (idle machine, MNIST-1D CNN, both sides with the stages' AdamW): a QAT
step costs about 1.25x an fp32 step with this module's fast paths (median of four runs; single runs
1.20-1.35), 1.41-1.45x before them; torch.ao 1.51x.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qpexp.core.quant import groups as G
from qpexp.core.quant.lsq import LearnedStep
from qpexp.core.quant.lsq import grad_factor as _grad_factor
from qpexp.core.quant.observer import RangeObserver
from qpexp.core.quant.qparams import (
    TINY_SCALE,
    affine_qparams,
    batch_range,
    int_range,
    reduce_dims,
    symmetric_scale,
)
from qpexp.core.quant.qparams import affine_qparams_scalar as affine_qparams_scalar  # (re-exported)
from qpexp.core.quant.qparams import inverse as _inverse
from qpexp.core.quant.spec import QuantSpec

FUSED_MAX_NUMEL = 4096  # from about this many elements on, the vectorized chain is faster on CPU


class _FakeQuant(torch.autograd.Function):
    """``(clamp(round(x/S) + Z, qmin, qmax) - Z) S`` with the straight-through estimator.

    The same numbers as torch's kernel (see the module doc). ``r = round(x/S) + Z`` is integer-valued,
    so "``qmin <= r <= qmax``" (the kernel's gradient mask) is "``qmin - 1/2 < r < qmax + 1/2``":
    ``hardtanh_backward`` computes it in one vectorized float op (comparisons into a bool mask
    are a slow path on CPU).
    """

    @staticmethod
    def forward(ctx, x, inv_scale, scale, zero, qmin, qmax):
        r = (x * inv_scale).round_().add_(zero)
        ctx.save_for_backward(r)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)
        return r.clamp(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, r, *ctx.bounds), None, None, None, None, None


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, ch_axis: int | None = None
) -> torch.Tensor:
    """Fake-quantize ``x`` per tensor (``ch_axis=None``; 1-element ``scale``/``zero``) or per channel.

    Equals ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` exactly, forward and
    backward; picks the fused kernel for small tensors and a vectorized chain for large ones.
    """
    if x.numel() < FUSED_MAX_NUMEL:
        if ch_axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, ch_axis, qmin, qmax)
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return _FakeQuant.apply(x, 1.0 / scale, scale, zero.to(scale.dtype), qmin, qmax)


class _FakeQuantScalar(torch.autograd.Function):
    """:class:`_FakeQuant` with Python-number qparams (per tensor): ``clamp(round(x/S), qmin-Z, qmax-Z) S``."""

    @staticmethod
    def forward(ctx, x, inv_scale: float, scale: float, zero: int, qmin: int, qmax: int):
        r = (x * inv_scale).round_()  # one buffer, not two
        ctx.save_for_backward(r)
        ctx.bounds = (qmin - zero - 0.5, qmax - zero + 0.5)
        return r.clamp(qmin - zero, qmax - zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, r, *ctx.bounds), None, None, None, None, None


def fake_quant_scalar(x: torch.Tensor, scale: float, zero: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization with Python-number qparams; ``scale`` must be a float32 value.
    Equals ``torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)`` exactly."""
    if x.numel() < FUSED_MAX_NUMEL:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
    inv = _inverse(scale)  # the kernel's ``1.0f / scale``
    return _FakeQuantScalar.apply(x, inv, scale, zero, qmin, qmax)


def fake_quant_unclamped(x: torch.Tensor, inv_scale, scale) -> torch.Tensor:
    """``round(x * inv_scale) * scale`` with gradient 1 everywhere: the fake quantization of a tensor
    none of whose codes is clamped (the caller checked that ``round(x * inv_scale) + Z`` lies in
    ``[qmin, qmax]`` for every element), so that clamping would change nothing and the straight-through
    mask is 1 everywhere. The same numbers as :func:`fake_quant` then, in three in-place passes over a
    clone: the clone carries the identity gradient in C++ (no Python backward, no saved tensor)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return (x * inv_scale).round_().mul_(scale)
    y = x.clone()
    y.detach().mul_(inv_scale).round_().mul_(scale)  # the alias is untracked: no grad-mode switch
    return y


def symmetric_weight(w: torch.Tensor, qmax: int, ch_axis: int | None) -> torch.Tensor | None:
    """A symmetric min/max weight's fake quantization, per channel along ``ch_axis`` or (``None``) per
    tensor: ``S = max|w| / qmax`` never clamps, since ``|round(w / S)| <= round(max|w| (1/S)) = qmax``
    (``max|w| (1/S)`` is ``qmax`` within three float32 roundings, far below 1/2 at any width; ``S`` at
    its floor only makes it smaller): the unclamped form, three passes, no mask. None (the general
    path) for a non-finite weight."""
    wd = w.detach()
    if ch_axis is not None:
        amax = torch.linalg.vector_norm(wd, math.inf, reduce_dims(wd, ch_axis), keepdim=True)  # max|w|
        top = amax.max().item()
    else:
        amax = torch.linalg.vector_norm(wd, math.inf)
        top = amax.item()
    if not math.isfinite(top):
        return None
    scale = amax.div_(qmax).clamp_min_(TINY_SCALE)
    return fake_quant_unclamped(w, scale.reciprocal(), scale)


def _invalidate_hook(module: LinearQuantizer, incompatible_keys) -> None:
    module._invalidate()


class LinearQuantizer(nn.Module):
    """Fake-quantizes a weight (``is_weight``) or an activation with the straight-through estimator.

    Weights with ``minmax`` take their range from the tensor at every call; activations keep a
    running min/max (``minmax``) or an EMA of batch min/max (``ema``) updated in training mode and
    frozen in eval mode (:class:`~qpexp.core.quant.observer.RangeObserver`). ``lsq`` learns the step
    size (Esser et al. 2020) through torch's learnable fused kernel
    (:class:`~qpexp.core.quant.lsq.LearnedStep`): step initialised to ``2 mean|v| / sqrt(Q_P)`` with
    ``Q_P = qmax`` (``2^(b-1)-1`` symmetric, ``2^b-1`` asymmetric: the unsigned case of the paper; an
    asymmetric quantizer keeps the zero point of its first batch's min/max range), gradient scaled by
    ``1/sqrt(N Q_P)`` with ``N`` the number of elements per step size.

    The state is this module's own (state-dict keys ``min_val``, ``max_val``, ``zero_point``,
    ``scale``, ``initialized``); the observer and the learned step are plain objects that read and
    write it through the module.

    ``granularity=group`` (weights, min/max range): one scale (and zero point) per group of
    ``group_size`` consecutive elements of an output row (:mod:`~qpexp.core.quant.groups`);
    ``row_size`` (``K``, the elements per output channel) sizes the buffers to ``C * ceil(K / g)``.
    """

    def __init__(
        self, spec: QuantSpec, is_weight: bool, channels: int = 1, ch_axis: int = 0, row_size: int = 0
    ):
        super().__init__()
        self.bits = spec.bits
        self.symmetric = spec.symmetric
        self.per_group = spec.granularity == "group"
        self.group_size = int(spec.group_size) if self.per_group else 0
        if self.per_group and (not is_weight or spec.range == "lsq" or row_size <= 0):
            raise ValueError(
                "quant.granularity=group: weights only, with a min/max range and the row size "
                f"(got is_weight={is_weight}, range={spec.range!r}, row_size={row_size})"
            )
        self.per_channel = spec.granularity == "channel"
        self.range = spec.range
        self.decay = spec.ema_decay
        self.is_weight = is_weight
        self.ch_axis = ch_axis
        self.qmin, self.qmax = int_range(self.bits, self.symmetric, spec.narrow_range)
        n = channels if self.per_channel else 1
        if self.per_group:
            n = channels * G.n_groups(row_size, self.group_size)
        self.register_buffer("min_val", torch.full((n,), math.inf))
        self.register_buffer("max_val", torch.full((n,), -math.inf))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if self.range == "lsq":
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._ready = False  # Python mirror of ``initialized`` (no tensor-to-bool sync per step)
        # a per-tensor activation keeps its range and qparams in Python numbers too: a training step
        # then costs one min/max reduction and two scalar reads unless the range grows
        self._scalar = not is_weight and not self.per_channel and self.range != "lsq"
        self._lsq = LearnedStep() if self.range == "lsq" else None
        self._observer = RangeObserver(self._scalar) if not is_weight and self._lsq is None else None
        self.register_load_state_dict_post_hook(_invalidate_hook)

    def _invalidate(self) -> None:
        """Forget every Python copy of the buffers (after a state dict is loaded or synced, or a move)."""
        self._ready = False
        if self._observer is not None:
            self._observer.invalidate()
        if self._lsq is not None:
            self._lsq.invalidate()

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() etc. may change the buffers
        self._invalidate()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "channel" if self.per_channel else "tensor"
        if self.per_group:
            kind = f"group({self.group_size})"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {sym}, per-{kind}, range={self.range}"

    def is_initialized(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _mark_initialized(self) -> None:
        if not self._ready:
            self.initialized.fill_(True)
            self._ready = True

    @torch.no_grad()
    def _weight_qparams(self, w: torch.Tensor):
        """Scale and zero point of a weight's own min/max range (per channel or per tensor; per group:
        of ``w`` already :func:`~qpexp.core.quant.groups.grouped`, one row per group)."""
        axis = self.ch_axis if self.per_channel else None
        if self.per_group:
            axis = 0
        if self.symmetric:
            scale = symmetric_scale(w, self.qmax, axis)
            if self.zero_point.shape != scale.shape:
                self.zero_point = torch.zeros_like(scale, dtype=torch.int32)
            return scale, self.zero_point  # stays 0: symmetric
        lo, hi = batch_range(w, axis)
        return affine_qparams(lo, hi, self.bits, False)

    # -- forward ----------------------------------------------------------------------------------
    def qparams(self, x: torch.Tensor | None = None):
        """(scale, zero_point) that the next forward would use; weights pass their tensor."""
        if self.range != "lsq" and self.is_weight and x is not None:
            if self.per_group:
                return self._weight_qparams(G.grouped(x.detach(), self.ch_axis, self.group_size))
            return self._weight_qparams(x)
        return self.scale.detach(), self.zero_point

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(N Q_P)``, ``N`` elements per step size, ``Q_P = qmax``."""
        return _grad_factor(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._lsq is not None:
            return self._lsq.forward(self, x)
        if self.is_weight:
            if self.per_group:
                return self._group_forward(x)
            if self.symmetric:
                y = symmetric_weight(x, self.qmax, self.ch_axis if self.per_channel else None)
                if y is not None:
                    return y
            scale, zero = self._weight_qparams(x)
        elif self._scalar:
            return self._scalar_activation(x)
        else:
            if self.training:
                self._observer.observe(self, x)
            elif not self.is_initialized():
                raise RuntimeError("activation quantizer used in eval mode before any calibration batch")
            scale, zero = self.scale, self.zero_point
        return fake_quant(x, scale, zero, self.qmin, self.qmax, self.ch_axis if self.per_channel else None)

    def _group_forward(self, w: torch.Tensor) -> torch.Tensor:
        """A weight fake-quantized per group: the per-channel arithmetic on its ``(C * G, g)`` view."""
        wg = G.grouped(w, self.ch_axis, self.group_size)
        y = symmetric_weight(wg, self.qmax, 0) if self.symmetric else None
        if y is None:
            scale, zero = self._weight_qparams(wg)
            y = fake_quant(wg, scale, zero, self.qmin, self.qmax, 0)
        return G.ungrouped(y, w.shape, self.ch_axis)

    def _scalar_activation(self, x: torch.Tensor) -> torch.Tensor:
        """A per-tensor activation (Python-number qparams). In training the batch's own min and max,
        read for the running range anyway, tell whether any code is clamped: ``x -> rint(x (1/S))`` is
        monotone (float32 products by a positive number round monotonically), so the codes of the
        batch lie between those of its min and its max; when both lie inside ``[qmin - Z, qmax - Z]``,
        nothing is clamped and the unclamped form gives the same numbers and the same gradient."""
        if self.training:
            lo_t, hi_t = torch.aminmax(x.detach())
            lo, hi = lo_t.item(), hi_t.item()
            m = self._observer.observe_scalar(self, lo, hi)
            if x.dtype == torch.float32 and m.unclamped(lo, hi):
                return fake_quant_unclamped(x, m.inv_t, m.scale_t)
        elif not self.is_initialized():
            raise RuntimeError("activation quantizer used in eval mode before any calibration batch")
        m = self._observer.current(self)
        return fake_quant_scalar(x, m.scale, m.zero, self.qmin, self.qmax)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``q`` with ``x_hat = S (q - Z)`` (the kernel's arithmetic)."""
        scale, zero = self.qparams(x)
        if self.per_group:
            xg = G.grouped(x, self.ch_axis, self.group_size)
            q = torch.round(xg * (1.0 / scale).reshape(-1, 1)) + zero.reshape(-1, 1)
            return G.ungrouped(q.clamp(self.qmin, self.qmax), x.shape, self.ch_axis).to(torch.int32)
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.ch_axis] = -1
        q = torch.round(x * (1.0 / scale).reshape(shape)) + zero.reshape(shape)
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def n_qparams(self) -> tuple[int, int]:
        """How many scales and stored zero points this quantizer needs (Z=0 is implicit if symmetric)."""
        n = self.scale.numel()
        return n, 0 if self.symmetric else n
