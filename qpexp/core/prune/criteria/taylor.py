"""First-order Taylor importance (Molchanov et al. 2017/2019).

Per batch ``b`` the loss change of removing a weight is estimated as ``g_b w``; for a group it is
``sum_group g_b w``. The score is that estimate squared (``mode='squared'``, Molchanov 2019) or its
absolute value (``'abs'``, Molchanov 2017), averaged over the observed batches.
"""

from __future__ import annotations

import torch

from qpexp.core.prune.criteria import Target, slice_view


class Taylor:
    needs_grads = True

    def __init__(self, mode: str = "squared"):
        self.mode = mode

    def __call__(self, t: Target, dim: int | None = None):
        if not t.grads:
            raise ValueError(f"taylor criterion got no gradients for layer {t.name!r}")
        w = t.weight.detach()
        total = torch.zeros(w.shape if dim is None else (w.shape[dim],), dtype=w.dtype)
        for g in t.grads:
            est = g * w if dim is None else slice_view(g * w, dim).sum(1)
            total += est.pow(2) if self.mode == "squared" else est.abs()
        return total / len(t.grads)
