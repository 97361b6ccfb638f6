"""First-order Taylor importance (Molchanov et al. 2017/2019).

Per batch ``b`` the loss change of removing a weight is estimated as ``g_b w``; for a group it is
``sum_group g_b w``. The score is that estimate squared (``mode='squared'``, Molchanov 2019) or its
absolute value (``'abs'``, Molchanov 2017), averaged over the observed batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.prune.criteria import Target, slice_view
from qpexp.core.prune.masks import prunable_weights


def weight_grads(model: nn.Module, batches, n_batches: int) -> dict[str, list[torch.Tensor]]:
    """The cross-entropy gradient of every prunable weight on each of the first ``n_batches`` of
    ``batches`` ((x, y) pairs): what a criterion with ``needs_grads`` reads from ``Target.grads``.

    The model runs in the mode it is in (training mode during a pruning stage: batch statistics), but
    the pass leaves it as it found it: every buffer (BatchNorm running statistics, observers) is
    restored and the gradients are cleared.
    """
    weights = prunable_weights(model)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in weights}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            for i, (x, y) in enumerate(batches):
                if i >= n_batches:
                    break
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                for n, m, pname in weights:
                    g = getattr(m, pname).grad
                    grads[n].append(
                        g.detach().clone() if g is not None else torch.zeros_like(getattr(m, pname))
                    )
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return grads


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
