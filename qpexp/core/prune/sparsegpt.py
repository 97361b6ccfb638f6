"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS mask selection and weight update.

For a weight ``W`` (``rows x d``) and its inputs' Hessian ``H = X^T X / n`` (:mod:`qpexp.core.quant.calibrate`),
the paper's Algorithm 1: ``U = chol((H + damp mean(diag H) I)^-1)^T`` (upper); the columns are
visited in blocks of ``block``; at the start of each block the mask of the block is chosen on the
current (already updated) weights by the OBS saliency ``w^2 / U_jj^2`` (``[H^-1]_jj`` restricted to
the remaining columns): the lowest ``round(sparsity x numel)`` of the block are pruned (unstructured),
or the ``m - n`` lowest of every group of ``m`` columns in each row (N:M, chosen when the group's
first column is reached). Then column by column: a pruned weight is set to zero and its error
``e = w_j / U_jj`` is fed into the columns not yet visited, ``W[:, j:] -= e U_{j, j:}`` (the OBS
update), lazily across blocks as in GPTQ. Weights already pruned (``weight_mask``) stay pruned.

Weights without calibration inputs (raw recurrent weights, embeddings) are pruned by magnitude at
the same ratio. Imports only torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qpexp.core.prune.masks import get_mask, prunable_weights, set_mask
from qpexp.core.prune.nm import check_nm, nm_mask
from qpexp.core.prune.unstructured import layer_masks
from qpexp.core.quant.calibrate import LayerStats, Site, calibrate_, sites
from qpexp.core.quant.gptq import inverse_hessian_upper


def _block_mask(w1: torch.Tensor, u1: torch.Tensor, sparsity: float, prior: torch.Tensor) -> torch.Tensor:
    """Unstructured: True where pruned, the lowest ``w^2 / U_jj^2`` of the block (prior ones first)."""
    score = w1.pow(2) / torch.diagonal(u1).pow(2).unsqueeze(0)
    score = torch.where(prior, torch.full_like(score, -math.inf), score)
    k = max(round(sparsity * score.numel()), int(prior.sum()))
    pruned = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        pruned[torch.topk(score.reshape(-1), k, largest=False).indices] = True
    return pruned.reshape(score.shape)


def sparsegpt_columns(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                      block: int = 128, damp: float = 0.01, prior: torch.Tensor | None = None):  # fmt: skip
    """SparseGPT on ``w`` (``rows x d``) with Hessian ``h``: returns (pruned and updated weight in
    float64, keep mask). ``nm=(n, m)``: keep ``n`` of every ``m`` (``sparsity`` is then ignored);
    ``prior``: True where already pruned."""
    w = w.double().clone()
    rows, d = w.shape
    prior = torch.zeros_like(w, dtype=torch.bool) if prior is None else prior.bool()
    if nm is not None:
        check_nm(*nm)
        block = max(nm[1], block // nm[1] * nm[1])  # a group never straddles two blocks
    u = inverse_hessian_upper(h, damp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        p1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            p1 = _block_mask(w1, u1, sparsity, prior[:, i1:i2])
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, min(i + nm[1], i2 - i1))
                score = w1[:, j].pow(2) / torch.diagonal(u1)[j].pow(2).unsqueeze(0)
                score = torch.where(prior[:, i1:i2][:, j], torch.full_like(score, -math.inf), score)
                p1[:, j] = nm_mask(score, *nm) == 0
            col = w1[:, i]
            q = torch.where(p1[:, i], torch.zeros_like(col), col)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = p1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w[pruned] = 0.0
    return w, ~pruned


@torch.no_grad()
def sparsegpt_layer_(site: Site, stats: LayerStats, sparsity: float, nm=None, block: int = 128,
                     damp: float = 0.01) -> dict:  # fmt: skip
    """SparseGPT on ``site``'s weight, in place: the weight updated, its mask buffer set."""

    weight = site.weight
    rows = weight.shape[0]
    w2 = weight.detach().reshape(rows, -1)
    old = get_mask(site.owner, site.pname)
    prior = (old.reshape(rows, -1) == 0) if old is not None else (w2 == 0)
    h = stats.mean_hessian()
    g = h.shape[0]
    per = rows // g
    new, keep = torch.empty_like(w2, dtype=torch.float64), torch.empty_like(w2, dtype=torch.bool)
    for gi in range(g):
        r = slice(gi * per, (gi + 1) * per)
        new[r], keep[r] = sparsegpt_columns(w2[r], h[gi], sparsity, nm, block, damp, prior[r])
    weight.copy_(new.to(weight.dtype).reshape(weight.shape))
    set_mask(site.owner, keep.reshape(weight.shape).to(weight.dtype), site.pname)
    return {"sparsity": float(1 - keep.float().mean())}


def sparsegpt_prune_(model: nn.Module, batches: list[torch.Tensor], ratios: dict[str, float], nm=None,
                     block: int = 128, damp: float = 0.01, sequential: bool = True) -> dict:  # fmt: skip
    """SparseGPT on every conv/linear weight (and self-attention ``in_proj_weight``) named in
    ``ratios`` (layer name -> fraction to prune; ignored with ``nm``), in place; every other named
    weight is pruned by magnitude. Returns :func:`~qpexp.core.quant.calibrate.calibrate_`'s record, with
    ``"magnitude"``: the names pruned by magnitude instead."""

    def compress(site: Site, stats: LayerStats):
        return sparsegpt_layer_(site, stats, ratios[site.name], nm, block, damp)

    reached = {s.name for s in sites(model)} & set(ratios)
    out = calibrate_(model, batches, compress, sequential=sequential, names=reached)
    rest = [(n, m, p) for n, m, p in prunable_weights(model) if n in ratios and n not in out["layers"]]
    for name, m, pname in rest:
        w = getattr(m, pname).detach()
        old = get_mask(m, pname)
        s = w.abs() if old is None else torch.where(old == 0, torch.full_like(w, -math.inf), w.abs())
        mask = nm_mask(s, *nm) if nm is not None else layer_masks({name: s}, {name: ratios[name]}, 0.0)[name]
        set_mask(m, mask, pname)
    out["magnitude"] = [n for n, _, _ in rest]
    return out


def sparsegpt_step(model: nn.Module, cfg, target: float, criterion=None, grads=None, example=None,
                   batches=None, calib=None) -> dict[str, float]:  # fmt: skip
    """:func:`~qpexp.core.prune.prune_step`'s signature for ``prune.method=sparsegpt``: every layer
    pruned to ``target`` (its own ``first_ratio``/``last_ratio`` where set; ``structure=nm``: n of
    every m) by SparseGPT on the unlabeled ``calib`` batches. ``criterion`` is not used (SparseGPT
    selects by its own OBS saliency). Returns each layer's realized sparsity; the calibration record
    is kept on the function's ``last`` attribute."""
    from qpexp.core.prune import layer_ratios

    if not calib:
        raise ValueError("prune.method=sparsegpt needs calibration batches (prune.calib_batches)")
    layers = prunable_weights(model)
    own = layer_ratios([n for n, _, _ in layers], cfg, target)
    ratios = {n: (target if r is None else r) for n, r in own.items()}
    ratios = {n: r for n, r in ratios.items() if r > 0}
    nm = (cfg.n, cfg.m) if cfg.structure == "nm" else None
    sparsegpt_step.last = sparsegpt_prune_(
        model, calib, ratios, nm, cfg.block, cfg.damp, cfg.calib_sequential
    )
    return {name: float((getattr(m, pname) == 0).float().mean()) for name, m, pname in layers}


sparsegpt_step.needs_calib = True
sparsegpt_step.last = {}
