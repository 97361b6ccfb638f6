"""Random scores: the control every pruning result should be compared against."""

from __future__ import annotations

import torch

from qpexp.core.prune.criteria import Target


class Random:
    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, t: Target, dim: int | None = None):
        shape = t.weight.shape if dim is None else (t.weight.shape[dim],)
        return torch.rand(shape, generator=self.gen)
