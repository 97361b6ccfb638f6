"""Unstructured masks with exact counts: global (one threshold), layer-wise (same fraction each) or
row-wise (the same fraction of every output row, Wanda's comparison group)."""

from __future__ import annotations

import math

import torch


def keep_minimum(n: int, min_keep_frac: float) -> int:
    """Weights a layer always keeps: at least one, at least ``min_keep_frac`` of them."""
    return min(n, max(1, math.ceil(min_keep_frac * n)))


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.ones(scores.numel())
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k=k, largest=False).indices] = 0
    return mask.reshape(scores.shape)


def _already(s: torch.Tensor) -> int:
    """Weights already pruned (scored ``-inf`` by the caller): a step never revives them."""
    return int(torch.isneginf(s).sum())


def layer_masks(scores: dict[str, torch.Tensor], ratios: dict[str, float], min_keep_frac: float):
    """Prune exactly ``round(ratio * n)`` lowest-scored weights of each layer (torch's rounding)."""
    out = {}
    for name, s in scores.items():
        n = s.numel()
        k = min(max(round(ratios[name] * n), _already(s)), n - keep_minimum(n, min_keep_frac))
        out[name] = _prune_lowest(s, k)
    return out


def global_masks(
    scores: dict[str, torch.Tensor], ratio: float, min_keep_frac: float, count: int | None = None
):
    """Prune exactly ``round(ratio * N)`` (or ``count``) lowest scores across all layers, on one scale.

    Scores are compared as they are (for magnitude: |w|, as in Han et al. and torch's
    ``global_unstructured``; for Taylor: the estimated loss change, already on one scale). Each
    layer's top ``keep_minimum`` weights are protected so that no layer is ever emptied.
    """
    names = list(scores)
    flat = []
    for name in names:
        s = scores[name].reshape(-1).clone().float()
        keep = keep_minimum(s.numel(), min_keep_frac)
        s[torch.topk(s, k=keep).indices] = math.inf
        flat.append(s)
    allv = torch.cat(flat)
    total = allv.numel()
    protected = int(torch.isposinf(allv).sum())
    k = round(ratio * total) if count is None else count
    k = min(max(k, _already(allv)), total - protected)
    mask = _prune_lowest(allv, k)
    out, i = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = mask[i : i + n].reshape(scores[name].shape)
        i += n
    return out


def row_masks(scores: torch.Tensor, ratio: float, min_keep_frac: float = 0.0) -> torch.Tensor:
    """Prune the ``round(ratio x row length)`` lowest scores of every output row (``scores`` reshaped
    to ``(rows, -1)``; ties: the lower column). Weights scored ``-inf`` (already pruned) stay pruned
    even where a row holds more of them; each row keeps its ``keep_minimum``."""
    s = scores.reshape(scores.shape[0], -1).float()
    n = s.shape[1]
    already = torch.isneginf(s).sum(1)
    goal = min(round(ratio * n), n - keep_minimum(n, min_keep_frac))
    k = torch.clamp(already, min=goal)
    order = torch.argsort(s, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand_as(order))
    return (rank >= k[:, None]).to(scores.dtype).reshape(scores.shape)
