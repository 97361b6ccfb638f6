"""Biases stored below fp32 (``quant.bias_bits``): the lever the compression papers leave out.

Deep Compression and soft weight-sharing count weights and indices only; qpexp's honest count adds
every bias at 32 bits, a share of a heavily pruned model's size that grows with its sparsity (a
record's ``size/<layer>/bias_bits`` shows it). A :class:`BiasQuantizer`
rounds a layer's bias in its forward, so training and evaluation see the stored values:

- ``bits=16``: IEEE half precision, ``b16 = float16(b)``; 16 bits per entry, no parameters;
- ``bits=8``: symmetric linear, one fp32 scale per layer ``S = max|b| / 127`` and codes
  ``q = clamp(round(b / S), -127, 127)``, stored ``8`` bits per entry plus the 32-bit scale
  (``S = 1`` for an all-zero bias).

The rounding passes gradients straight through (``b + (round(b) - b).detach()``), so the latent
float bias keeps training. Storage: :meth:`storage_bits`, which :func:`qpexp.core.accounting.size_bits`
reads. The integer file and ONNX keep float biases, so ``quant.bias_bits`` below 32 is accepted only
with ``quant.scheme=codebook`` (models that have neither; :class:`qpexp.core.quant.spec.QuantConfig`).
"""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.quant.spec import BIAS_BITS, FLOAT_BITS

SCALE_BITS = FLOAT_BITS  # the int8 scale is stored as fp32, like every quantizer's scale


class BiasQuantizer(nn.Module):
    """Rounds a bias to ``bits`` (8: symmetric int8 with one fp32 scale; 16: float16) in forward."""

    def __init__(self, bits: int):
        super().__init__()
        if bits not in BIAS_BITS or bits == FLOAT_BITS:
            raise ValueError(f"quant.bias_bits={bits!r}: a bias quantizer stores 8 or 16 bits (32: none)")
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}, " + ("float16" if self.bits == 16 else "int8, one fp32 scale")

    def scale(self, b: torch.Tensor) -> torch.Tensor:
        """The 8-bit scale ``max|b| / 127`` (1 for an all-zero bias)."""
        m = b.detach().abs().max()
        return torch.where(m > 0, m / 127, torch.ones_like(m))

    def rounded(self, b: torch.Tensor) -> torch.Tensor:
        """The stored values (no gradient)."""
        b = b.detach()
        if self.bits == 16:
            return b.half().to(b.dtype)
        s = self.scale(b)
        return torch.clamp(torch.round(b / s), -127, 127) * s

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + (self.rounded(b) - b).detach()  # straight through

    def storage_bits(self, numel: int) -> int:
        """Bits stored for a bias of ``numel`` entries: the entries, plus the scale at 8 bits."""
        return numel * self.bits + (SCALE_BITS if self.bits == 8 else 0)


def make_bias_quantizer(bits: int) -> BiasQuantizer | None:
    """None for 32 (the bias stays float), else a :class:`BiasQuantizer`."""
    return None if bits == FLOAT_BITS else BiasQuantizer(bits)
