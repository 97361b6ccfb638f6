"""``prune.scope=auto``: each layer's share of a pruning step from measured sensitivity, under the
same exact budget as the other scopes.

At each step a plan gives every layer of the pool (every channel group, for channel pruning) a
fraction. It starts from what is already pruned and grows greedily: each round tries one more tenth
(:data:`FRACTIONS`; the next one that removes anything, for a layer of few channels) of each layer,
on top of the plan so far, pruned by the run's criterion; it measures the validation loss of the
whole model without training, and takes the layer whose tenth costs the least loss per weight
removed (NetAdapt-style joint measurement: the layers' effects are
not assumed to add up, unlike a per-layer knapsack). It stops once the plan removes the step's goal.

The step then removes weights (channels) in the order of their position within their layer relative
to the layer's planned fraction, until exactly the goal is removed: the last tenth planned is cut
short in proportion so the count is exact. A layer planned at its current fraction loses nothing
more while others can give. Cost: at most (tenths planned) x (layers) evaluations of
``prune.auto_batches`` validation batches per step. Torch only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qpexp.core.evaluate import evaluate
from qpexp.core.prune.unstructured import layer_masks

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0, 0.1, ..., 0.9 of a layer


def need_batches(batches) -> list:
    """The validation batches, or a ValueError naming the setting when there are none."""
    batches = list(batches or [])
    if not batches:
        raise ValueError(
            "prune.scope=auto measures each layer's sensitivity on validation batches: the pruner got none "
            "(pass batches=[(x, y), ...]; the pipeline passes prune.auto_batches of the validation split)"
        )
    return batches


def val_loss(model: nn.Module, batches) -> float:
    """Mean cross-entropy of ``model`` in eval mode over ``batches`` of (x, y)."""
    return evaluate(model, batches)[1]


def greedy_plan(names: list[str], current: dict[str, float], trial, loss, goal: int) -> dict[str, float]:
    """Planned fraction per layer in ``names`` (starting at ``current``), grown a tenth at a time on
    the layer with the least loss increase per weight removed until ``goal`` more weights are removed.

    ``trial(name, fraction)`` prunes that layer to ``fraction`` on top of the plan so far and returns
    ``(weights removed, undo)``, ``undo()`` reverting it; ``loss()`` is the model's loss as it stands.
    The plan's trials stay applied when this returns (the caller restores the model)."""
    planned = dict(current)
    done, base = 0, loss()
    while done < goal:
        best = None
        for name in names:
            for f in (x for x in FRACTIONS if x > planned[name] + 1e-9):
                gone, undo = trial(name, f)  # the layer's next tenth that removes something
                cost = loss() - base if gone > 0 else 0.0
                undo()
                if gone > 0:
                    if best is None or cost / gone < best[0]:
                        best = (cost / gone, name, f, cost)
                    break
        if best is None:
            break  # nothing more can go (every layer at its last tenth or its minimum)
        _, name, f, cost = best
        gone, _ = trial(name, f)
        planned[name] = f
        done, base = done + gone, base + cost
    return planned


def order_key(position: float, current: float, planned: float) -> float:
    """Removal order of a unit at ``position`` (its layer's pruned fraction once it goes): relative
    to the layer's planned fraction; never before the other layers when nothing more is planned."""
    return position / planned if planned > current else math.inf


def planned_scores(scores: torch.Tensor, current: float, planned: float) -> torch.Tensor:
    """Unstructured: each weight's :func:`order_key` from its rank in the layer's ``scores`` (already
    pruned weights scored ``-inf`` stay first)."""
    n = scores.numel()
    flat = scores.reshape(-1).float()
    order = torch.argsort(flat, stable=True)
    position = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    key = position / planned if planned > current else torch.full((n,), math.inf, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    out[order] = key
    out[torch.isneginf(flat)] = -math.inf
    return out.reshape(scores.shape)


@torch.no_grad()
def unstructured_fractions(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    goal: int,
    cfg,
    batches,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(planned, current)`` fractions of each layer of the pool (``weights``: name -> its weight
    tensor, pruned in place while planning and restored)."""
    saved = {n: w.detach().clone() for n, w in weights.items()}
    current = {n: int(torch.isneginf(scores[n]).sum()) / scores[n].numel() for n in weights}
    kept = {n: (~torch.isneginf(scores[n])).to(weights[n].dtype) for n in weights}  # the plan's masks

    def trial(name: str, f: float):
        w, old = weights[name], kept[name]
        mask = layer_masks({name: scores[name]}, {name: f}, cfg.min_keep_frac)[name].to(w.dtype)
        gone = int((old - mask).clamp_min(0).sum())
        kept[name] = mask
        w.copy_(saved[name] * mask)

        def undo():
            kept[name] = old
            w.copy_(saved[name] * old)

        return gone, undo

    try:
        planned = greedy_plan(list(weights), current, trial, lambda: val_loss(model, batches), goal)
    finally:
        for n, w in weights.items():
            w.copy_(saved[n])
    return planned, current
