"""Wanda (Sun et al. 2024): a weight's importance is ``|W_ij| * ||X_j||_2``, its magnitude times the
norm of the input feature it multiplies over the calibration data (no gradients, no weight update).

The norms come from :meth:`Wanda.calibrate` (one pass over unlabeled batches,
:mod:`qpexp.core.quant.calibrate`: a conv's unfolded patches, a quantized layer's quantized input). The
paper compares scores within each output row: ``prune.scope=row`` (:func:`row_masks`); the scores can
also be ranked by the other scopes (``layer``: within each layer) or in N:M groups
(``prune.structure=nm``: within each group of a row). A weight without calibration inputs (raw
recurrent weights, embeddings) is scored by ``|W|`` alone. Unstructured only (``dim=None``).
"""

from __future__ import annotations

import torch

from qpexp.core.prune.criteria import Target
from qpexp.core.prune.unstructured import row_masks  # noqa: F401  (its home before prune.scope=row)
from qpexp.core.quant.calibrate import calibrate_


def wanda_scores(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * norm`` for ``w`` (``out x ...``) and ``norms`` (``groups x d``, ``d`` columns per row
    of ``w.reshape(out, -1)``; row ``r`` belongs to group ``r // (out / groups)``)."""
    rows = w.shape[0]
    per = rows // norms.shape[0]
    scale = norms.to(w.dtype).repeat_interleave(per, dim=0)
    return (w.reshape(rows, -1).abs() * scale).reshape(w.shape)


class Wanda:
    needs_inputs = True

    def __init__(self):
        self.norms: dict[str, torch.Tensor] = {}

    def calibrate(self, model, batches) -> dict:
        """Measure every weight's input norms on ``batches`` in one pass (the model is not changed)."""

        def keep(site, stats):
            self.norms[site.name] = stats.input_norms()

        return calibrate_(model, batches, keep, sequential=False, hessian=False)

    def __call__(self, t: Target, dim: int | None = None):
        if dim is not None:
            raise ValueError(
                "prune.criterion=wanda scores single weights: use prune.structure=unstructured or nm"
            )
        w = t.weight.detach()
        norms = self.norms.get(t.name)
        return w.abs() if norms is None else wanda_scores(w, norms)
