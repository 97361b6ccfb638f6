"""Learned step size quantization (LSQ, Esser et al. 2020) through torch's learnable fused kernels.

The step (the quantizer's ``scale`` parameter) is initialised from the first batch to
``2 mean|v| / sqrt(Q_P)`` with ``Q_P = qmax`` (``2^(b-1)-1`` symmetric, ``2^b-1`` asymmetric: the
unsigned case of the paper; an asymmetric quantizer keeps the zero point of its first batch's min/max
range), and its gradient is scaled by ``1/sqrt(N Q_P)`` with ``N`` the number of elements per step
size (:func:`grad_factor`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qpexp.core.quant.qparams import affine_qparams, batch_range, mean_abs


def grad_factor(q: nn.Module, x: torch.Tensor) -> float:
    """LSQ gradient scale ``1 / sqrt(N Q_P)``, ``N`` elements per step size, ``Q_P = qmax``."""
    numel = x.numel() / (q.scale.numel() if q.per_channel else 1)
    return 1.0 / math.sqrt(numel * q.qmax)


class LearnedStep:
    """The LSQ forward of a quantizer ``q`` (passed to each method; its ``scale`` parameter is the step,
    its buffers ``zero_point``, ``min_val``, ``max_val`` and ``initialized`` are set from the first
    batch). A plain object, not an ``nn.Module``: it holds only ``zero_float``, the zero point as the
    fused kernel takes it (float32; None until the next forward after :meth:`invalidate`)."""

    __slots__ = ("zero_float",)

    def __init__(self):
        self.zero_float: torch.Tensor | None = None

    def invalidate(self) -> None:
        """Forget the float zero point (the buffers changed: a state dict loaded, the module moved)."""
        self.zero_float = None

    @torch.no_grad()
    def init(self, q: nn.Module, x: torch.Tensor) -> None:
        """Initialise the step (and an asymmetric zero point) from the first batch ``x``."""
        axis = q.ch_axis if q.per_channel else None
        lo, hi = batch_range(x, axis)
        if not q.symmetric:
            _, zero = affine_qparams(lo, hi, q.bits, False)
            q.zero_point.copy_(zero)
        q.scale.copy_((2 * mean_abs(x, axis) / math.sqrt(q.qmax)).clamp_min(1e-8))
        q.min_val.copy_(lo)
        q.max_val.copy_(hi)
        self.zero_float = None
        q._mark_initialized()

    def forward(self, q: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the learned step (initialised from ``x`` on the first call)."""
        if not q.is_initialized():
            self.init(q, x)
        zero = self.zero_float
        if zero is None:
            zero = self.zero_float = q.zero_point.to(torch.float32)
        if q.per_channel:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, q.scale, zero, q.ch_axis, q.qmin, q.qmax, grad_factor(q, x)
            )
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, q.scale, zero, q.qmin, q.qmax, grad_factor(q, x)
        )
