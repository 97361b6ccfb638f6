"""FPGM (He et al. 2019): filters near the geometric median of their layer are the most redundant.

A filter's score is its summed Euclidean distance to all other filters of the layer; structured only.
"""

from __future__ import annotations

import torch

from qpexp.core.prune.criteria import Target, slice_view


class FPGM:
    def __call__(self, t: Target, dim: int | None = None):
        if dim is None:
            raise ValueError("prune.criterion=fpgm scores filters: use it with prune.structure=channel")
        v = slice_view(t.weight.detach(), dim)
        return torch.cdist(v, v).sum(1)
