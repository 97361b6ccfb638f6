"""Linear (affine) fake quantizer: ``r = S (q - Z)`` on torch's fused fake-quantize kernels."""

from __future__ import annotations

import math

import torch
from torch import nn

from qpexp.core.quant.spec import QuantSpec


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: narrow signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` when symmetric, else ``[0, 2^b-1]``."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for the range [lo, hi] (tensors, per channel or 0-d).

    Asymmetric: the range is widened to contain 0, ``S = (max - min) / (2^b - 1)``,
    ``Z = -round(min / S)``, so that 0 is exactly representable. Symmetric: ``Z = 0``,
    ``S = max|x| / (2^(b-1) - 1)``.
    """
    qmin, qmax = int_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny * 2**24  # keeps 1/S finite
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(tiny)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(tiny)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


class LinearQuantizer(nn.Module):
    """Fake-quantizes a weight (``is_weight``) or an activation with the straight-through estimator.

    Weights with ``minmax`` take their range from the tensor at every call; activations keep a
    running min/max (``minmax``) or an EMA of batch min/max (``ema``) updated in training mode and
    frozen in eval mode. ``lsq`` learns the step size (Esser et al. 2020) through torch's learnable
    fused kernel, with the gradient scale ``1/sqrt(N Q_P)``.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool, channels: int = 1, ch_axis: int = 0):
        super().__init__()
        self.bits = spec.bits
        self.symmetric = spec.symmetric
        self.per_channel = spec.granularity == "channel"
        self.range = spec.range
        self.decay = spec.ema_decay
        self.is_weight = is_weight
        self.ch_axis = ch_axis
        self.qmin, self.qmax = int_range(self.bits, self.symmetric)
        n = channels if self.per_channel else 1
        self.register_buffer("min_val", torch.full((n,), math.inf))
        self.register_buffer("max_val", torch.full((n,), -math.inf))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if self.range == "lsq":
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        kind = "channel" if self.per_channel else "tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {sym}, per-{kind}, range={self.range}"

    # -- ranges -----------------------------------------------------------------------------------
    def _batch_range(self, x: torch.Tensor):
        if self.per_channel:
            flat = x.detach().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
            return flat.amin(1), flat.amax(1)
        lo, hi = torch.aminmax(x.detach())
        return lo.reshape(1), hi.reshape(1)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.range == "ema" and bool(self.initialized):
            self.min_val.mul_(self.decay).add_(lo, alpha=1 - self.decay)
            self.max_val.mul_(self.decay).add_(hi, alpha=1 - self.decay)
        elif self.range == "ema":
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        scale, zero = affine_qparams(self.min_val, self.max_val, self.bits, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _init_lsq(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.symmetric:
            if self.per_channel:
                mean_abs = x.detach().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1).abs()
                mean_abs = mean_abs.mean(1)
            else:
                mean_abs = x.detach().abs().mean().reshape(1)
            self.scale.copy_((2 * mean_abs / math.sqrt(self.qmax)).clamp_min(1e-8))
        else:
            scale, zero = affine_qparams(lo, hi, self.bits, False)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized.fill_(True)

    # -- forward ----------------------------------------------------------------------------------
    def qparams(self, x: torch.Tensor | None = None):
        """(scale, zero_point) that the next forward would use; weights pass their tensor."""
        if self.range != "lsq" and self.is_weight and x is not None:
            lo, hi = self._batch_range(x)
            return affine_qparams(lo, hi, self.bits, self.symmetric)
        return self.scale.detach(), self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.range == "lsq":
            if not bool(self.initialized):
                self._init_lsq(x)
            numel = x.numel() / (self.scale.numel() if self.per_channel else 1)
            grad_factor = 1.0 / math.sqrt(numel * self.qmax)
            zero = self.zero_point.to(torch.float32)
            scale = self.scale
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, scale, zero, self.ch_axis, self.qmin, self.qmax, grad_factor
                )
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero, self.qmin, self.qmax, grad_factor
            )
        if self.is_weight:
            scale, zero = self.qparams(x)
        else:
            if self.training:
                self._observe(x)
            elif not bool(self.initialized):
                raise RuntimeError("activation quantizer used in eval mode before any calibration batch")
            scale, zero = self.scale, self.zero_point
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, scale, zero, self.ch_axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, self.qmin, self.qmax)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``q`` with ``x_hat = S (q - Z)``."""
        scale, zero = self.qparams(x)
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self.ch_axis] = -1
        # same arithmetic as torch's kernel: nearbyint(x * (1/S)) + Z
        q = torch.round(x * (1.0 / scale).reshape(shape)) + zero.reshape(shape)
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def n_qparams(self) -> tuple[int, int]:
        """How many scales and stored zero points this quantizer needs (Z=0 is implicit if symmetric)."""
        n = self.scale.numel()
        return n, 0 if self.symmetric else n
