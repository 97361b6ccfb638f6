"""Compression core: quantizers, pruners, accounting. Plain torch only (no Lightning/Hydra/W&B)."""

from qpexp.core.accounting import (
    count_params,
    model_macs,
    prunable_params,
    pruned_fraction,
    size_bits,
    sparsity,
    zero_fraction,
)
from qpexp.core.prune import PruneConfig, apply_masks_, prune_step
from qpexp.core.quant import QuantConfig, QuantSpec, convert, quantize_

__all__ = [
    "QuantConfig",
    "QuantSpec",
    "quantize_",
    "convert",
    "PruneConfig",
    "prune_step",
    "apply_masks_",
    "size_bits",
    "sparsity",
    "pruned_fraction",
    "zero_fraction",
    "prunable_params",
    "count_params",
    "model_macs",
]
