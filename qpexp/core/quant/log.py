"""Logarithmic quantizers: power-of-two levels (Miyashita et al. 2016) and log companding."""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.quant.spec import QuantSpec


def _absmax(x: torch.Tensor, per_channel: bool, ch_axis: int) -> torch.Tensor:
    if not per_channel:
        return x.detach().abs().amax().reshape(1)
    return x.detach().transpose(0, ch_axis).reshape(x.shape[ch_axis], -1).abs().amax(1)


def _bcast(v: torch.Tensor, x: torch.Tensor, per_channel: bool, ch_axis: int) -> torch.Tensor:
    if not per_channel:
        return v.reshape([])
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return v.reshape(shape)


class _LogBase(nn.Module):
    def __init__(self, spec: QuantSpec, is_weight: bool, channels: int = 1, ch_axis: int = 0):
        super().__init__()
        self.bits = spec.bits
        self.per_channel = spec.granularity == "channel"
        self.ch_axis = ch_axis
        self.is_weight = is_weight
        self.symmetric = True
        n = channels if self.per_channel else 1
        # running max|x| for activations (weights use their own max at every call)
        self.register_buffer("max_abs", torch.zeros(n))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._ready = False  # Python mirror of ``initialized``

    @torch.no_grad()
    def _range(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_weight:
            return _absmax(x, self.per_channel, self.ch_axis)
        if self.training:
            torch.maximum(self.max_abs, _absmax(x, self.per_channel, self.ch_axis), out=self.max_abs)
            if not self._ready:
                self.initialized.fill_(True)
                self._ready = True
        return self.max_abs

    @torch.no_grad()
    def scale_max(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The range ``M`` (per tensor or per channel, ``>= 1e-30``) that ``x`` is coded against
        (a weight's own max|x|; an activation's running max|x|, which this does not update)."""
        m = _absmax(x, self.per_channel, self.ch_axis) if self.is_weight else self.max_abs
        return m.clamp_min(1e-30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            m = _bcast(self._range(x).clamp_min(1e-30), x, self.per_channel, self.ch_axis)
            q = self.dequantize(self.codes(x, m), m)
        # straight-through estimator: the value is exactly q, the gradient is 1
        return q + (x - x.detach())

    def n_qparams(self) -> tuple[int, int]:
        return self.max_abs.numel(), 0

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Signed integer codes (see :meth:`codes`) against the range :meth:`scale_max`."""
        m = _bcast(self.scale_max(x), x, self.per_channel, self.ch_axis)
        return self.codes(x, m).to(torch.int32)


class Pow2Quantizer(_LogBase):
    """Levels ``0`` and ``±2^k`` for ``k`` in ``[k_max - L + 1, k_max]``, ``L = 2^(b-1) - 1``.

    ``k_max = round(log2 max|x|)``; each value is rounded to the nearest level in the log domain and
    values below the smallest level's lower rounding edge become 0 (sign bit plus ``b-1`` bits for
    the exponent index, one code reserved for zero). Small values get finer absolute resolution.
    """

    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def codes(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Signed code: 0 for zero, ``±(k - k_min + 1)`` for ``±2^k``."""
        kmax = torch.round(torch.log2(m))
        kmin = kmax - (self.levels() - 1)
        k = torch.round(torch.log2(x.abs().clamp_min(1e-38)))
        idx = torch.clamp(k, max=kmax) - kmin + 1
        idx = torch.where(k < kmin, torch.zeros_like(idx), idx)
        return torch.sign(x) * idx

    def dequantize(self, codes: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        kmin = torch.round(torch.log2(m)) - (self.levels() - 1)
        mag = torch.exp2(codes.abs() + kmin - 1)
        return torch.where(codes == 0, torch.zeros_like(mag), torch.sign(codes) * mag)


class CompandingQuantizer(_LogBase):
    """Log companding (mu-law style): ``q = round(a log2(1 + |x|/M)) sign(x)``, ``a = 2^(b-1) - 1``.

    Decoding is ``x = sign(q) M (2^(|q|/a) - 1)``: uniform in the compressed domain, so the levels
    are denser near 0. It is not a power-of-two quantizer: levels are not powers of two.
    """

    def codes(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        a = 2 ** (self.bits - 1) - 1
        return torch.sign(x) * torch.round(a * torch.log2(1 + (x.abs() / m).clamp(max=1.0)))

    def dequantize(self, codes: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        a = 2 ** (self.bits - 1) - 1
        return torch.sign(codes) * m * (torch.exp2(codes.abs() / a) - 1)
