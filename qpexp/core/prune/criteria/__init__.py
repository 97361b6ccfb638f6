"""Pruning criteria. A criterion is any callable ``criterion(target, dim=None) -> scores``.

``dim=None`` scores each weight (same shape as ``target.weight``); ``dim=k`` scores each slice
along axis ``k`` (one score per output channel for ``k=0``). Higher score = more important.
A criterion that needs gradients sets ``needs_grads = True``; ``target.grads`` then holds one
gradient of the weight per observed batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Target:
    name: str
    weight: torch.Tensor
    grads: list[torch.Tensor] = field(default_factory=list)


def slice_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as (number of slices along ``dim``, elements per slice)."""
    return t.transpose(0, dim).reshape(t.shape[dim], -1)
