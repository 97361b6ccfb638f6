"""Dead units: output channels that do no work after unstructured pruning, removed for real.

Unstructured pruning leaves some output channels (units) of a conv/linear layer doing nothing:

* **unread**: every consumer's input columns for the channel are zero (column ``j`` of a
  LeNet-300-100's fc2 for unit ``j`` of fc1): the channel is multiplied by zero wherever it is read;
* **constant**: every weight row of the channel is zero, so what reaches its consumers does not
  depend on the input (``act(bias)``, pooled, normalised per channel). When every consumer is a
  linear layer, the constant is measured on ``example`` (and checked constant across it), folded
  into the consumer's bias (``bias += W[:, cols] @ c``) and the columns are zeroed: it is then
  unread. A constant channel read by a convolution is kept (zero padding makes it vary at the
  borders).

:func:`remove_dead_units` removes both with the channel-pruning machinery
(:mod:`qpexp.core.prune.channel`: the dependency graph finds every coupled slice: the channel's
rows and bias, BatchNorm entries, the consumers' columns), keeps the unstructured masks of what
remains (re-derived as "nonzero", which is what a masked weight is), and checks that the smaller
model computes the masked model's logits on ``example``. The removed rows, bias entries and columns
are then not stored at all, and no index entry skips over them: the storage count
(:mod:`qpexp.core.accounting`) of the smaller tensors is lower although the function is the same.
Removed weights count as pruned (``final/sparsity`` rises by the nonzeros they held).

Channels a channel-pruning group cannot remove (classifier outputs, attention, channels normalised
together) are left alone, as are channels read by anything but conv/linear weight columns.
"""

from __future__ import annotations

import torch
from torch import nn

from qpexp.core.modules import CONV_LINEAR
from qpexp.core.prune.channel import (
    Group,
    _apply_structure,
    _logits,
    _remember_dense_params,
    check_same_logits,
    groups,
)
from qpexp.core.prune.masks import get_mask, prunable_weights, set_mask, strip_masks

Slice = tuple[nn.Module, str, int, torch.Tensor]


def _value(module: nn.Module, pname: str, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """The slice as the model computes with it (masked)."""
    p = getattr(module, pname).detach()
    m = get_mask(module, pname)
    return (p if m is None else p * m).index_select(dim, idx)


def _weight(sl: Slice, dim: int) -> bool:
    module, pname, d, _ = sl
    return isinstance(module, CONV_LINEAR) and pname == "weight" and d == dim


def _columns(slices: list[Slice]) -> list[Slice] | None:
    """The consumers' input columns of a unit; None when something else reads it (raw weights,
    embeddings) or nothing does."""
    reads = [s for s in slices if s[2] >= 1]
    cols = [s for s in reads if _weight(s, 1)]
    return cols if cols and len(cols) == len(reads) else None


def _zero(slices: list[Slice]) -> bool:
    return all(not bool(_value(*s).any()) for s in slices)


@torch.no_grad()
def _consumer_inputs(model: nn.Module, example: torch.Tensor, modules: list[nn.Module]) -> dict:
    """The input of each module in ``modules`` on ``example`` (eval mode), flattened to (rows, in)."""
    seen, hooks = {}, []

    def keep(mod, inp, out) -> None:
        seen.setdefault(id(mod), inp[0])

    for m in modules:
        hooks.append(m.register_forward_hook(keep))
    try:
        _logits(model, example)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.reshape(-1, v.shape[-1]) for k, v in seen.items()}


@torch.no_grad()
def _fold(model: nn.Module, example: torch.Tensor, cols: list[Slice], atol: float = 1e-6) -> bool:
    """Fold a constant channel's columns into their linear consumers' biases and zero the columns;
    False (nothing changed) when a consumer is not linear, has no bias, or sees a varying input."""
    if not all(isinstance(m, nn.Linear) and m.bias is not None for m, *_ in cols):
        return False
    inputs = _consumer_inputs(model, example, [m for m, *_ in cols])
    consts = []
    for module, _, _, idx in cols:
        x = inputs[id(module)][:, idx]
        if float((x.max(0).values - x.min(0).values).abs().max()) > atol * max(1.0, float(x.abs().max())):
            return False
        consts.append(x[0])
    for (module, pname, dim, idx), c in zip(cols, consts):
        module.bias += _value(module, pname, dim, idx) @ c
        keep = torch.ones_like(module.weight)
        keep.index_fill_(1, idx, 0)
        old = get_mask(module)
        set_mask(module, keep if old is None else old * keep)
    return True


def dead_units(model: nn.Module, example: torch.Tensor, grps: list[Group] | None = None) -> dict:
    """Per group (root layer name): the channels whose units are unread, after folding the constant
    ones into linear consumers (this folds: ``model`` changes, computing the same function)."""
    dead: dict[str, list[int]] = {}
    for g in grps if grps is not None else groups(model, example):
        if g.kind != "channels":
            continue
        for unit in g.units:
            slices = [s for c in unit for s in g.slices[c]]
            cols = _columns(slices)
            if cols is None:
                continue
            rows = [s for s in slices if _weight(s, 0)]
            if not _zero(cols) and not (rows and _zero(rows) and _fold(model, example, cols)):
                continue
            dead.setdefault(g.name, []).extend(unit)
    return dead


@torch.no_grad()
def remove_dead_units(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> dict[str, list[int]]:
    """Remove every dead unit (module doc) in place; return the kept channels per group that lost
    any (``{root layer: [kept, ...]}``, the structure :func:`~qpexp.core.prune.channel.restore_structure`
    replays). Raises ``RuntimeError`` when the smaller model's logits differ from the original's."""
    _remember_dense_params(model)
    before = _logits(model, example)
    grps = groups(model, example)
    n = {g.name: g.n for g in grps}
    dead = dead_units(model, example, grps)
    kept = {name: [c for c in range(n[name]) if c not in set(d)] for name, d in dead.items()}
    masked = {(id(m), p) for _, m, p in prunable_weights(model) if get_mask(m, p) is not None}
    strip_masks(model)
    _apply_structure(model, example, kept)
    for _, m, p in prunable_weights(model):  # the unstructured masks of what remains: its nonzeros
        if (id(m), p) in masked:
            set_mask(m, (getattr(m, p) != 0).to(getattr(m, p).dtype), p)
    check_same_logits(before, _logits(model, example), atol, "removing the dead units changed the logits")
    return kept


__all__ = ["dead_units", "remove_dead_units"]
