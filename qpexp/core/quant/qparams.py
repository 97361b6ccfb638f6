"""Scale and zero point of a range, on tensors and on Python numbers, and the ranges they start from.

:func:`affine_qparams` computes them on tensors (per channel or 0-d); :func:`affine_qparams_scalar`
does the same float32 operations on Python floats, each result rounded to float32 through ``struct``
(:func:`f32`), so that a per-tensor quantizer can keep its qparams as Python numbers, equal to the
tensor path's bit for bit. :func:`batch_range`, :func:`mean_abs` and :func:`symmetric_scale` are the
reductions of a tensor that a range, a learned step or a weight's own scale starts from.
"""

from __future__ import annotations

import math
import struct

import torch

TINY_SCALE = torch.finfo(torch.float32).tiny * 2**24  # keeps 1/S finite


def int_range(bits: int, symmetric: bool, narrow: bool = True) -> tuple[int, int]:
    """Integer range: narrow signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` when symmetric (full signed
    ``[-2^(b-1), 2^(b-1)-1]`` when not ``narrow``), else ``[0, 2^b-1]``."""
    if symmetric:
        return -(2 ** (bits - 1) - int(narrow)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for the range [lo, hi] (tensors, per channel or 0-d).

    Asymmetric: the range is widened to contain 0, ``S = (max - min) / (2^b - 1)``,
    ``Z = -round(min / S)``, so that 0 is exactly representable. Symmetric: ``Z = 0``,
    ``S = max|x| / (2^(b-1) - 1)``.
    """
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min_(TINY_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo = lo.clamp(max=0.0)
    scale = (hi.clamp(min=0.0) - lo).div_(qmax - qmin).clamp_min_(TINY_SCALE)
    zero = torch.round(lo / scale).neg_().add_(qmin).clamp_(qmin, qmax).to(torch.int32)
    return scale, zero


_F32 = struct.Struct("f")


def f32(v: float) -> float:
    """``v`` rounded to float32 (to nearest, ties to even), as a Python float. A sum, difference,
    product or quotient of two float32 values computed in double precision and then rounded so is
    the float32 operation's result bit for bit (53 >= 2 x 24 + 2 bits), without numpy's per-scalar
    cost."""
    try:
        return _F32.unpack(_F32.pack(v))[0]
    except OverflowError:  # beyond float32's range: float32 arithmetic gives infinity
        return math.copysign(math.inf, v)


def inverse(scale: float) -> float:
    """``1/S`` as torch's kernels take it: ``1.0f / scale`` in float32."""
    return f32(1.0 / scale)


def affine_qparams_scalar(lo: float, hi: float, bits: int, symmetric: bool) -> tuple[float, int]:
    """:func:`affine_qparams` for one range in Python numbers: the same float32 operations, so the
    same scale and zero point bit for bit (``lo``/``hi`` must be float32 values)."""
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        return max(f32(max(abs(lo), abs(hi)) / qmax), TINY_SCALE), 0
    lo0 = min(lo, 0.0)
    scale = max(f32(f32(max(hi, 0.0) - lo0) / (qmax - qmin)), TINY_SCALE)
    zero = min(max(qmin - round(f32(lo0 / scale)), qmin), qmax)
    return scale, int(zero)


def reduce_dims(x: torch.Tensor, ch_axis: int) -> tuple[int, ...]:
    """Every dimension of ``x`` but the channel axis."""
    return tuple(d for d in range(x.dim()) if d != ch_axis % x.dim())


def batch_range(x: torch.Tensor, ch_axis: int | None):
    """(min, max) of ``x`` per channel along ``ch_axis``, or (``ch_axis=None``) of the whole tensor
    as 1-element tensors; detached."""
    x = x.detach()
    if ch_axis is not None:
        flat = x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)
        return torch.aminmax(flat, dim=1)
    lo, hi = torch.aminmax(x)
    return lo.reshape(1), hi.reshape(1)


def mean_abs(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """``mean|x|`` per channel along ``ch_axis``, or (``None``) of the whole tensor as a 1-element
    tensor; detached."""
    x = x.detach().abs()
    return x.mean(reduce_dims(x, ch_axis)) if ch_axis is not None else x.mean().reshape(1)


def symmetric_scale(w: torch.Tensor, qmax: int, ch_axis: int | None) -> torch.Tensor:
    """``S = max|w| / qmax`` (at least :data:`TINY_SCALE`) per channel along ``ch_axis``, or (``None``)
    of the whole tensor as a 1-element tensor: a symmetric weight's scale from its own range."""
    w = w.detach()
    amax = w.abs().amax(reduce_dims(w, ch_axis)) if ch_axis is not None else w.abs().amax().reshape(1)
    return amax.div_(qmax).clamp_min_(TINY_SCALE)


def range_setters(w: torch.Tensor, dims, symmetric: bool) -> torch.Tensor:
    """The entries of ``w`` whose value sets a min/max quantizer's range over ``dims`` (``max|w|`` when
    symmetric, else the min and the max): :func:`hold_range` keeps them as they are."""
    if symmetric:
        a = w.abs()
        return a == a.amax(dims, keepdim=True)
    return (w == w.amin(dims, keepdim=True)) | (w == w.amax(dims, keepdim=True))


def hold_range(
    w: torch.Tensor, new: torch.Tensor, setters: torch.Tensor, dims, symmetric: bool
) -> torch.Tensor:
    """``new`` (rounded weights) with the range-setting entries of ``w`` (``setters``) kept and every
    other entry clamped into ``w``'s range over ``dims`` (zero included, symmetric when the quantizer
    is), so that a min/max quantizer recomputes from ``new`` the scale it had from ``w``."""
    lo = w.amin(dims, keepdim=True).clamp(max=0)
    hi = w.amax(dims, keepdim=True).clamp(min=0)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    return torch.where(setters, w, torch.minimum(torch.maximum(new, lo), hi))
