"""Pruning: criteria (one file each), schedules (plain functions), masks as buffers, exact counts."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from qpexp.core.prune import auto
from qpexp.core.prune.criteria import Target
from qpexp.core.prune.masks import (
    MaskKeeper,
    apply_masks_,
    ensure_masks,
    get_mask,
    prunable_layers,
    prunable_weights,
    set_mask,
    strip_masks,
)
from qpexp.core.prune.nm import nm_mask
from qpexp.core.prune.schedules import schedule
from qpexp.core.prune.spec import CRITERIA, PruneConfig
from qpexp.core.prune.unstructured import global_masks, layer_masks, row_masks
from qpexp.core.resolve import resolve


def make_criterion(cfg: PruneConfig):
    """Instantiate ``cfg.criterion``, passing the options its constructor accepts."""
    cls = resolve(cfg.criterion, CRITERIA, "prune.criterion")
    options = {"mode": cfg.taylor_mode, "seed": cfg.seed}
    params = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in params})


def layer_ratios(names: list[str], cfg: PruneConfig, target: float) -> dict[str, float | None]:
    """Each layer's own ratio (first/last when set), or None for the shared pool at ``target``."""
    out: dict[str, float | None] = dict.fromkeys(names)
    if not names or cfg.ratio == 0:
        return out
    scale = target / cfg.ratio  # the schedule's progress, applied to own ratios too
    if cfg.first_ratio is not None:
        out[names[0]] = cfg.first_ratio * scale
    if cfg.last_ratio is not None:
        out[names[-1]] = cfg.last_ratio * scale
    return out


@torch.no_grad()
def prune_step(
    model: nn.Module,
    cfg: PruneConfig,
    target: float,
    criterion=None,
    grads: dict[str, list[torch.Tensor]] | None = None,
    example: torch.Tensor | None = None,
    batches=None,
) -> dict[str, float]:
    """Set unstructured masks so that a fraction ``target`` of prunable weights is zero.

    ``target`` is the fraction of all prunable weights: layers with their own ratio (``first_ratio``,
    ``last_ratio``) take theirs and the other layers (the pool) make up the rest, ranked on one scale
    (``scope=global``), by the same fraction each (``scope=layer``), or by fractions planned from
    each layer's measured sensitivity on the validation ``batches`` (``scope=auto``,
    :mod:`qpexp.core.prune.auto`). Already-pruned weights score lowest, so masks only grow. Returns
    each layer's realized sparsity.
    Channel pruning lives in :mod:`qpexp.core.prune.channel`; both pruners share this signature
    (``example``, an input sample for tracing the model, is only needed there).
    """
    layers = prunable_weights(model)
    own = layer_ratios([n for n, _, _ in layers], cfg, target)
    scores = _scores(layers, cfg, criterion or make_criterion(cfg), grads)
    if cfg.structure == "nm":  # n of every m in every layer (a layer with its own ratio 0 stays dense)
        for name, m, pname in layers:
            if own[name] != 0:
                keep = nm_mask(scores[name], cfg.n, cfg.m)
                old = get_mask(m, pname)
                set_mask(m, keep if old is None else keep * old, pname)
    else:
        masks = _unstructured_masks(model, layers, scores, own, cfg, target, batches)
        for name, m, pname in layers:
            set_mask(m, masks[name], pname)
    return {name: float((getattr(m, pname) == 0).float().mean()) for name, m, pname in layers}


def _scores(layers, cfg: PruneConfig, criterion, grads) -> dict[str, torch.Tensor]:
    """Each layer's criterion scores, divided by its quality (``prune.quality``); already-pruned
    weights score ``-inf``, so masks only grow."""
    scores = {}
    for name, m, pname in layers:
        s = criterion(Target(name, getattr(m, pname), (grads or {}).get(name, []))).float()
        if cfg.quality:
            s = s / float(cfg.quality.get(name, 1.0))
        mask = get_mask(m, pname)
        if mask is not None:
            s = torch.where(mask == 0, torch.full_like(s, -torch.inf), s)
        scores[name] = s
    return scores


def _unstructured_masks(model, layers, scores, own, cfg: PruneConfig, target: float, batches) -> dict:
    """Layers with their own ratio first; the pool then removes what makes the total ``target``
    (one scale, the same fraction each, or fractions planned from measured sensitivity)."""
    names = [n for n, _, _ in layers]
    fixed = [n for n in names if own[n] is not None]
    masks = layer_masks({n: scores[n] for n in fixed}, {n: own[n] for n in fixed}, cfg.min_keep_frac)
    pool = [n for n in names if own[n] is None]
    size = {n: scores[n].numel() for n in names}
    goal = round(target * sum(size.values())) - sum(int((masks[n] == 0).sum()) for n in fixed)
    pooled = {n: scores[n] for n in pool}
    if pool and cfg.scope == "auto":
        weights = {n: getattr(m, pname) for n, m, pname in layers if n in pool}
        already = sum(int(torch.isneginf(s).sum()) for s in pooled.values())
        batches = auto.need_batches(batches)
        planned, current = auto.unstructured_fractions(model, weights, pooled, goal - already, cfg, batches)
        keys = {n: auto.planned_scores(pooled[n], current[n], planned[n]) for n in pool}
        masks.update(global_masks(keys, target, cfg.min_keep_frac, count=max(goal, 0)))
    elif pool and cfg.scope == "global":
        masks.update(global_masks(pooled, target, cfg.min_keep_frac, count=max(goal, 0)))
    elif pool:
        n_pool = sum(size[n] for n in pool)
        r = min(max(goal / n_pool, 0.0), 1.0) if fixed else target  # torch's per-layer rounding
        if cfg.scope == "row":
            masks.update({n: row_masks(pooled[n], r, cfg.min_keep_frac) for n in pool})
        else:
            masks.update(layer_masks(pooled, dict.fromkeys(pool, r), cfg.min_keep_frac))
    return masks


def check_quality(model: nn.Module, cfg: PruneConfig) -> None:
    """``prune.quality`` names only prunable layers of ``model`` (checked before any training)."""
    if not cfg.quality:
        return
    names = [n for n, _, _ in prunable_weights(model)]
    unknown = sorted(set(cfg.quality) - set(names))
    if unknown:
        raise ValueError(
            f"prune.quality: {unknown} are not prunable layers of the model; use some of {names}"
        )


__all__ = [
    "PruneConfig",
    "Target",
    "MaskKeeper",
    "apply_masks_",
    "ensure_masks",
    "get_mask",
    "set_mask",
    "strip_masks",
    "prunable_layers",
    "prunable_weights",
    "prune_step",
    "make_criterion",
    "check_quality",
    "schedule",
]
