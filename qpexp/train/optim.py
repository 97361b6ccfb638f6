"""The optimizer every training stage uses, in one place (the benchmarks time the same one)."""

from __future__ import annotations

import torch


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with torch's multi-tensor (``foreach``) update. On CPU torch picks the single-tensor loop
    by default; the multi-tensor update gives the same numbers bit for bit (tests/test_optim.py) and
    costs less per parameter, which matters for a quantized model's many one-element step sizes
    (``python -m qpexp.bench qat``)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
