"""Han et al. 2015's threshold: a weight is pruned when ``|w| < quality x std`` of its layer's weights.

Scores are ``|w| / std(layer)``, the std taken over the layer's surviving (nonzero) weights. With
``scope=global`` one threshold on these scores is one shared ``quality`` for every layer, so pruning
the lowest scores to a total ``ratio`` is Han's rule with the quality that removes exactly that many
weights; each layer keeps what its own std lets through (``layers/<name>/sparsity`` in the record).
Iterating (``schedule``, ``steps``) with fine-tuning at 1/10 of the learning rate is their recipe.
"""

from __future__ import annotations

import torch

from qpexp.core.prune.criteria import Target, slice_view


def layer_std(w: torch.Tensor) -> torch.Tensor:
    """Std of the nonzero entries (all entries if fewer than two are nonzero)."""
    alive = w[w != 0]
    s = (alive if alive.numel() > 1 else w.reshape(-1)).float().std()
    return s if s > 0 else torch.ones(())


class Std:
    def __call__(self, t: Target, dim: int | None = None):
        w = t.weight.detach()
        if dim is None:
            return w.abs() / layer_std(w)
        norms = slice_view(w, dim).abs().sum(1)  # filters: their L1 norm against the std of the norms
        return norms / layer_std(norms)
