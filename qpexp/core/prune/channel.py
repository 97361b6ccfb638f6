"""Channel pruning: whole output channels of conv/linear layers, and whole attention heads.

**Groups.** Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds, for each prunable root
layer, every parameter slice coupled to its output channels: the root's weight rows and bias, the
following BatchNorm, every layer that adds into the same residual stream (their rows too), depthwise
convolutions (in and out channels at once), concatenations (with offsets), flatten/reshape into a
linear layer, raw per-channel ``nn.Parameter`` tensors, and every consumer's input columns. Each
``nn.MultiheadAttention`` adds one more group of its own: its heads (see
:mod:`qpexp.core.prune.attention`); a transformer's MLP width is an ordinary group (fc1 rows, fc2
columns).

**Units.** A grouped convolution (``1 < groups < channels``) must keep the same number of channels
in each of its groups, so channels at the same position of every conv group are removed together;
a unit is such a set (a single channel everywhere else, one head for attention).

**Scores.** A unit's importance is the sum, over every conv/linear weight (and raw weight matrix)
of its group, of the criterion's score of the unit's slices: the root's rows, the rows of every
layer coupled through residual adds or depthwise convs, and every consumer's columns
(``criterion(target, dim=0)`` for rows, ``dim=1`` for columns). This is Torch-Pruning's group
importance with ``group_reduction='sum'``: for L1 it is the L1 norm of everything the unit removes.

**Masks.** During fine-tuning a pruned unit is **masked**: every coupled slice gets a zero in a
``<param>_mask`` buffer that :class:`MaskKeeper` re-applies after each optimizer step. The unit's
output is then exactly zero and the consumers ignore it. :func:`physically_prune` removes the masked
units (Torch-Pruning for channels; :class:`HeadPrunedAttention` for heads), checks that the smaller
model computes the same logits, and returns the kept indices per group, which
:func:`restore_structure` replays on a freshly built model before its state dict is loaded.

**Not pruned, by design** (:func:`analyse` lists them with the reason): the classifier's outputs
(the classes); channels normalised together (LayerNorm/GroupNorm over the channel axis: removing
one would change the statistics of the others, so masked and removed models would differ: a
transformer's residual stream); the embedding dimension of an attention module (its heads are
pruned instead); channels read through a fixed slice or split (``x[:, :8]``, ``torch.split``,
``torch.chunk``: the forward code would still cut at the old place). A module that holds
parameters coupled to a group and that channel pruning does not know how to slice raises
:class:`ChannelPruningError` naming it; :func:`dry_run` (run before any training) also removes a
few units of every group from a copy of the model and refuses, naming the group, any construction
whose removal does not reproduce the masked logits.

``ratio`` is the fraction of prunable weights (every weight matrix) removed, counting the coupled
removals. Units are removed one by one in the scope's order; the step stops at the unit whose
removed parameter count is closest to the target.

* ``scope=layer``: every group loses the same fraction of its channels.
* ``scope=global``: one ranking across groups on **per-group normalised scores**: each unit's score
  divided by the mean score of its group's remaining units (Torch-Pruning's ``normalizer='mean'``),
  so the ranking removes units that are weak *relative to their group*.

No group keeps fewer than ``min_keep_channels`` channels (heads) and no layer keeps fewer than
``keep_minimum(n, min_keep_frac)`` of its weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qpexp.core.modules import CONV, CONV_LINEAR
from qpexp.core.prune import layer_ratios, make_criterion
from qpexp.core.prune.attention import HeadPrunedAttention, head_slices, is_attention, unsupported
from qpexp.core.prune.auto import greedy_plan, need_batches, order_key, val_loss
from qpexp.core.prune.criteria import Target
from qpexp.core.prune.masks import prunable_weights, strip_masks
from qpexp.core.prune.unstructured import keep_minimum

NORMS_ACROSS_CHANNELS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
HEADS = ":heads"  # group name suffix of an attention module's heads

Slice = tuple[nn.Module, str, int, torch.Tensor]  # (module, parameter name, dim, indices)


class ChannelPruningError(NotImplementedError):
    """A construction channel pruning cannot handle; the message names the module."""


@dataclass
class Group:
    """One root layer's output channels (or one attention module's heads) and every parameter slice
    coupled to each channel."""

    name: str  # the root layer, or "<attention module>:heads"
    root: nn.Module
    n: int
    slices: list[list[Slice]] = field(default_factory=list)  # per channel
    touched: set[str] = field(default_factory=set)  # prunable weights whose slices it changes
    units: list[list[int]] = field(default_factory=list)  # channels removed together
    # weight slices that score the group: (layer name, module, param, dim, member idxs, root idxs, conv groups)
    scored: list[tuple] = field(default_factory=list)
    kind: str = "channels"  # or "heads"


@dataclass
class Plan:
    groups: list[Group]
    frozen: dict[str, str]  # group name -> why it is not pruned


def _tp():
    import torch_pruning as tp

    return tp


def build_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode (no BN statistics change)."""
    tp = _tp()
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        model.train(was)


def _feeds_output(node, seen: set | None = None) -> bool:
    """Whether the outputs of ``node`` reach the model output without passing a conv/linear layer."""
    seen = set() if seen is None else seen
    if not node.outputs:
        return True
    for o in node.outputs:
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o.module, CONV_LINEAR):
            continue  # consumed by the next layer: its input columns are pruned with it
        if _feeds_output(o, seen):
            return True
    return False


def _is_grouped(m: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (Torch-Pruning prunes depthwise in and out together)."""
    return isinstance(m, CONV) and m.groups > 1 and not (m.groups == m.out_channels == m.in_channels)


class _Units:
    """Union-find over a group's channels: channels that must be removed together."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, members: list[int]) -> None:
        for a in members[1:]:
            ra, rb = self.find(members[0]), self.find(a)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def units(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return sorted(out.values())


class _GroupSlices:
    """Collects the parameter slices of a Torch-Pruning group into ``grp``, per root channel, and the
    channels that must go together (``uf``)."""

    def __init__(self, grp: Group, wnames: dict):
        self.grp, self.wnames = grp, wnames
        self.uf = _Units(grp.n)

    def add(self, module, pname, dim, idxs, roots, layer_idxs=None, conv_groups=1) -> None:
        """The slices ``layer_idxs`` (default ``idxs``) of ``module.<pname>`` along ``dim``, each under
        its root channel; a prunable weight also scores the group."""
        grp = self.grp
        layer_idxs = idxs if layer_idxs is None else layer_idxs
        order = torch.argsort(roots, stable=True)
        uniq, counts = torch.unique_consecutive(roots[order], return_counts=True)
        for c, part in zip(uniq.tolist(), torch.split(layer_idxs[order], counts.tolist())):
            grp.slices[c].append((module, pname, dim, part))
        w = self.wnames.get((id(module), pname))
        if w is not None:
            grp.touched.add(w)
            grp.scored.append((w, module, pname, dim, idxs, roots, conv_groups))

    def conv_linear(self, module: nn.Module, idxs, roots, out: bool) -> None:
        """A conv/linear layer's output (weight rows, bias) or input (weight columns) channels."""
        if _is_grouped(module):
            size = (module.out_channels if out else module.in_channels) // module.groups
            for pos in torch.unique(idxs % size).tolist():  # one channel per conv group goes together
                self.uf.union(torch.unique(roots[idxs % size == pos]).tolist())
        if out:
            self.add(module, "weight", 0, idxs, roots)
            if module.bias is not None:
                self.add(module, "bias", 0, idxs, roots)
        elif _is_grouped(module):
            size = module.in_channels // module.groups
            self.add(module, "weight", 1, idxs, roots, layer_idxs=idxs % size, conv_groups=module.groups)
        else:
            self.add(module, "weight", 1, idxs, roots)

    def other(self, module, idxs, roots, label: str) -> str | None:
        """Any other member of the group: its per-channel parameters, or the reason the group is left
        unpruned; raises for parameters it does not know how to slice."""
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            for p in ("weight", "bias"):
                if getattr(module, p, None) is not None:
                    self.add(module, p, 0, idxs, roots)
            return None
        if isinstance(module, NORMS_ACROSS_CHANNELS):
            return f"its channels are normalised together by {type(module).__name__} '{label}'"
        if isinstance(module, nn.MultiheadAttention):
            return f"they are the embedding dimension of attention '{label}' (its heads are pruned instead)"
        if isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self.add(module, "weight", 0, idxs, roots)
            return None
        if isinstance(module, nn.Embedding):
            self.add(module, "weight", 1, idxs, roots)
            return None
        if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
            raise ChannelPruningError(
                f"module '{label}' ({type(module).__name__}) holds parameters coupled to the channels of "
                f"'{self.grp.name}' and channel pruning does not know how to slice them"
            )
        return None


def _channel_group(dg, g, names, wnames, params, pdims) -> Group | str:
    """A Torch-Pruning group as a :class:`Group`, or the reason it is left unpruned."""
    tp = _tp()
    op = tp.ops.OPTYPE
    root = g[0].dep.target.module
    n = dg.get_out_channels(root)
    sl = _GroupSlices(Group(names[root], root, n, [[] for _ in range(n)]), wnames)
    for it in g:
        t = it.dep.target
        module = t.module
        idxs = torch.as_tensor(list(it.idxs), dtype=torch.long)
        roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
        out = dg.is_out_channel_pruning_fn(it.dep.handler)
        label = names.get(module, type(module).__name__)
        if t.type in (op.SLICE, op.SPLIT, op.UNBIND):
            return "its channels are read through a fixed channel slice or split (x[:, a:b], torch.split, torch.chunk)"
        if t.type == op.PARAMETER:
            owner, pname, pfull = params[id(module)]
            sl.add(owner, pname, pdims.get(id(module), module.dim() - 1), idxs, roots)
        elif isinstance(module, CONV_LINEAR):
            sl.conv_linear(module, idxs, roots, out)
        else:
            why = sl.other(module, idxs, roots, label)
            if why is not None:
                return why
    sl.grp.units = sl.uf.units()
    return sl.grp


def _head_group(name: str, m: nn.Module, wnames) -> Group | str:
    why = unsupported(m)
    if why:
        return why
    h, per_head = head_slices(m)
    grp = Group(f"{name}{HEADS}", m, h, [[] for _ in range(h)], kind="heads")
    for c, sl in enumerate(per_head):
        for module, pname, dim, idx in sl:
            grp.slices[c].append((module, pname, dim, idx))
            w = wnames.get((id(module), pname))
            if w is not None:
                grp.touched.add(w)
                grp.scored.append((w, module, pname, dim, idx, torch.full_like(idx, c), 1))
    grp.units = [[c] for c in range(h)]
    return grp


def analyse(model: nn.Module, example: torch.Tensor, graph=None) -> Plan:
    """Every prunable group of ``model`` (ordered by the root's position in the model) and the
    groups left unpruned by design, with the reason."""
    dg = graph or build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    wnames = {(id(m), p): n for n, m, p in prunable_weights(model)}
    params = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                params[id(p)] = (m, pname, f"{mname}.{pname}" if mname else pname)
    pdims = {id(u.parameters): u.pruning_dim for u in dg.unwrapped_parameters}
    groups, frozen = [], {}
    for g in dg.get_all_groups(root_module_types=CONV_LINEAR):
        members = [it.dep.target for it in g if dg.is_out_channel_pruning_fn(it.dep.handler)]
        if any(isinstance(nd.module, CONV_LINEAR) and _feeds_output(nd) for nd in members):
            continue  # the classifier (or a layer coupled to it): its outputs are the model's outputs
        grp = _channel_group(dg, g, names, wnames, params, pdims)
        if isinstance(grp, str):
            frozen[names[g[0].dep.target.module]] = grp
        else:
            groups.append(grp)
    for name, m in model.named_modules():
        if is_attention(m) and m.num_heads > 1:
            grp = _head_group(name, m, wnames)
            if isinstance(grp, str):
                frozen[f"{name}{HEADS}"] = grp
            else:
                groups.append(grp)
    groups.sort(key=lambda grp: order[grp.name.removesuffix(HEADS)])
    return Plan(groups, frozen)


def groups(model: nn.Module, example: torch.Tensor, graph=None) -> list[Group]:
    """Every prunable group of ``model`` (see :func:`analyse`)."""
    return analyse(model, example, graph).groups


@torch.no_grad()
def group_scores(g: Group, criterion, grads: dict | None = None) -> torch.Tensor:
    """Per channel of ``g``: the sum of the criterion's scores of its slices in every weight of the group."""
    total = torch.zeros(g.n)
    grads = grads or {}
    for layer, module, pname, dim, idxs, roots, conv_groups in g.scored:
        w = getattr(module, pname)
        gr = grads.get(layer, [])
        if (
            conv_groups > 1
        ):  # a grouped conv's input columns: score within the rows of the column's conv group
            per_out = w.shape[0] // conv_groups
            per_in = w.shape[1]
            for j in range(conv_groups):
                rows = slice(j * per_out, (j + 1) * per_out)
                s = criterion(Target(layer, w[rows], [x[rows] for x in gr]), dim=1).float()
                sel = (idxs // per_in) == j
                total.index_add_(0, roots[sel], s[idxs[sel] % per_in])
            continue
        s = criterion(Target(layer, w, gr), dim=dim).float()
        total.index_add_(0, roots, s[idxs])
    return total


# -- masks ----------------------------------------------------------------------------------------
class _Masks:
    """Working copies of every coupled parameter's mask (and every prunable weight's, for counting)."""

    def __init__(self, model: nn.Module, grps: list[Group]):
        self.t: dict[tuple[int, str], torch.Tensor] = {}
        self.owner: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        weights = prunable_weights(model)
        for _, m, p in weights:
            self._add(m, p)
        self.coupled: set[tuple[int, str]] = set()  # the masks written: parameters in some group
        for g in grps:
            for sl in g.slices:
                for module, pname, _, _ in sl:
                    self._add(module, pname)
                    self.coupled.add((id(module), pname))
        self.layers = [(n, self.t[(id(m), p)]) for n, m, p in weights]
        self.layer_of = {(id(m), p): n for n, m, p in weights}
        self.alive = {n: int(t.sum()) for n, t in self.layers}  # kept weights per prunable weight

    def _add(self, module: nn.Module, pname: str) -> None:
        key = (id(module), pname)
        if key in self.t:
            return
        param = getattr(module, pname)
        old = getattr(module, f"{pname}_mask", None)
        self.t[key] = (old.detach().clone() if old is not None else torch.ones_like(param)).float()
        self.owner[key] = (module, pname)

    def kept(self) -> int:
        return sum(self.alive.values())

    def remove(self, slices) -> list:
        """Zero slices (counting each weight once); returns what is needed to undo it."""
        undo = []
        for module, pname, dim, idx in slices:
            key = (id(module), pname)
            t = self.t[key]
            old = t.index_select(dim, idx).clone()
            undo.append((key, dim, idx, old))
            t.index_fill_(dim, idx, 0)
            if key in self.layer_of:
                self.alive[self.layer_of[key]] -= int(old.sum())
        return undo

    def undo(self, undo: list) -> None:
        for key, dim, idx, old in reversed(undo):
            t = self.t[key]
            if key in self.layer_of:
                self.alive[self.layer_of[key]] += int(old.sum() - t.index_select(dim, idx).sum())
            t.index_copy_(dim, idx, old)

    @torch.no_grad()
    def write(self) -> None:
        for key, t in self.t.items():
            if key not in self.coupled:
                continue
            module, pname = self.owner[key]
            param = getattr(module, pname)
            mask = t.to(dtype=param.dtype, device=param.device)
            bname = f"{pname}_mask"
            if getattr(module, bname, None) is None:
                module.register_buffer(bname, mask.clone())
            else:
                getattr(module, bname).copy_(mask)
            param.mul_(getattr(module, bname))


def _channel_mask(g: Group, c: int, masks: _Masks | None) -> torch.Tensor | None:
    module, pname, dim, idx = g.slices[c][0]
    t = masks.t.get((id(module), pname)) if masks is not None else getattr(module, f"{pname}_mask", None)
    return None if t is None else t.index_select(dim, idx)


def pruned_channels(g: Group, masks: _Masks | None = None) -> list[int]:
    """Channels of ``g`` already pruned: their first slice (the root's row, the head's query rows) is
    all zero in the mask."""
    out = []
    for c in range(g.n):
        t = _channel_mask(g, c, masks) if g.slices[c] else None
        if t is not None and not bool(t.any()):
            out.append(c)
    return out


# -- one pruning step ------------------------------------------------------------------------------
def _own_ratios(grps: list[Group], model: nn.Module, cfg, target: float) -> dict[str, float]:
    """Groups with their own ratio: the first layer's (``first_ratio``) and the group(s) feeding the
    last layer (``last_ratio``), scaled by the schedule's progress. A ratio r removes round(r n) of the
    group's channels, i.e. a fraction r of that first/last layer's weights."""
    names = [n for n, _, _ in prunable_weights(model)]
    own = layer_ratios(names, cfg, target)
    out: dict[str, float] = {}
    for layer in (names[0], names[-1]) if names else ():
        r = own.get(layer)
        if r is None:
            continue
        for g in grps:
            if layer in g.touched:
                out[g.name] = min(r, out.get(g.name, r))
    return out


def _ranked_units(g: Group, scores: torch.Tensor, pruned: set[int]) -> list[tuple[float, list[int]]]:
    """The group's remaining units with their summed scores, weakest first (ties keep channel order)."""
    alive = [u for u in g.units if not pruned.intersection(u)]
    return sorted(((float(scores[u].sum()), u) for u in alive), key=lambda t: t[0])


@torch.no_grad()
def channel_prune_step(
    model: nn.Module,
    cfg,
    target: float,
    criterion=None,
    grads: dict[str, list[torch.Tensor]] | None = None,
    example: torch.Tensor | None = None,
    batches=None,
) -> dict[str, float]:
    """Mask whole channels (heads) so that a fraction ``target`` of prunable weights is removed (as
    closely as units allow). Already-pruned channels stay pruned. ``scope=auto`` plans each group's
    fraction from its measured sensitivity on the validation ``batches``. Returns each layer's
    realized sparsity."""
    if example is None:
        raise ValueError("channel pruning traces the model: pass an example input (example=...)")
    criterion = criterion or make_criterion(cfg)
    grps = groups(model, example)
    masks = _Masks(model, grps)
    layer_n = {n: t.numel() for n, t in masks.layers}
    total = sum(layer_n.values())
    goal = round(target * total)

    state = {g.name: set(pruned_channels(g, masks)) for g in grps}
    scores = {g.name: group_scores(g, criterion, grads) for g in grps}
    min_ch = {g.name: min(g.n, max(cfg.min_keep_channels, 1)) for g in grps}

    def try_remove(g: Group, unit: list[int], limit: int | None) -> str:
        """Remove a unit of g: 'ok', 'skip' (would empty a layer) or 'stop' (past the target)."""
        if g.n - len(state[g.name]) - len(unit) < min_ch[g.name]:
            return "skip"
        before = total - masks.kept()
        undo = masks.remove([s for c in unit for s in g.slices[c]])
        for name in g.touched:
            if masks.alive[name] < keep_minimum(layer_n[name], cfg.min_keep_frac):
                masks.undo(undo)
                return "skip"
        after = total - masks.kept()
        if limit is not None:
            if after > limit and after - limit >= limit - before:
                masks.undo(undo)  # stopping before this unit is at least as close to the target
                return "stop"
        state[g.name].update(unit)
        return "ok" if limit is None or after < limit else "stop"

    # groups with their own ratio (first/last layer): a channel count of their own
    own = _own_ratios(grps, model, cfg, target)
    _remove_own(grps, own, scores, state, try_remove)

    # the shared pool fills the remaining parameter budget, in the scope's order
    pool = [g for g in grps if g.name not in own]
    planned = None
    if cfg.scope == "auto" and pool:
        planned = _auto_plan(model, pool, scores, state, masks, try_remove, total, goal, batches)
    order = _pool_order(pool, scores, state, cfg.scope, planned)
    if total - masks.kept() < goal:
        for _, _, _, g, u in order:
            if try_remove(g, u, goal) == "stop":
                break
    masks.write()
    return {name: (layer_n[name] - masks.alive[name]) / layer_n[name] for name, _ in masks.layers}


def _remove_own(grps, own: dict, scores, state, try_remove) -> None:
    """Groups with their own ratio (first/last layer): remove their lowest-scored units up to
    their own channel count."""
    for g in grps:
        if g.name not in own:
            continue
        want = min(round(own[g.name] * g.n), g.n)
        for _, u in _ranked_units(g, scores[g.name], state[g.name]):
            if len(state[g.name]) + len(u) > want:
                break
            try_remove(g, u, None)


def _pool_order(pool, scores, state, scope: str, planned) -> list[tuple]:
    """The shared pool's units in removal order: ``(key, group index, rank, group, unit)`` sorted on
    the first three. ``global``: score over the group's mean score; otherwise the group's removed
    fraction once the unit goes (its middle), mapped through the ``auto`` plan when there is one."""
    order = []
    for gi, g in enumerate(pool):
        ranked = _ranked_units(g, scores[g.name], state[g.name])
        if scope == "global":
            mean = sum(s for s, _ in ranked) / len(ranked) if ranked else 0.0
            keys = [s / mean if mean > 0 else s for s, _ in ranked]
        else:  # layer: the group's removed fraction once this unit goes (its middle, round to nearest)
            p, keys = len(state[g.name]), []
            p0 = p / g.n
            for _, u in ranked:
                position = (p + len(u) / 2) / g.n
                keys.append(position if planned is None else order_key(position, p0, planned[g.name]))
                p += len(u)
        order += [(k, gi, j, g, u) for j, (k, (_, u)) in enumerate(zip(keys, ranked))]
    order.sort(key=lambda t: t[:3])
    return order


def _auto_plan(model, pool, scores, state, masks: _Masks, try_remove, total: int, goal: int, batches):
    """``scope=auto``: each pool group's planned fraction (:func:`qpexp.core.prune.auto.greedy_plan`).
    A trial removes a group's weakest remaining units up to a fraction; the loss is measured with the
    working masks applied to the parameters. Parameters, masks and removal state are restored."""
    batches = need_batches(batches)
    params = {k: getattr(*masks.owner[k]) for k in masks.coupled}
    saved = {k: p.detach().clone() for k, p in params.items()}
    groups_by_name = {g.name: g for g in pool}

    def snapshot():
        return (
            {k: t.clone() for k, t in masks.t.items()},
            dict(masks.alive),
            {n: set(v) for n, v in state.items()},
        )

    def restore(snap) -> None:
        for key, t in snap[0].items():  # in place: masks.layers shares these tensors
            masks.t[key].copy_(t)
        masks.alive.clear()
        masks.alive.update(snap[1])
        state.clear()
        state.update(snap[2])

    def trial(name: str, f: float):
        g, snap = groups_by_name[name], snapshot()
        before = total - masks.kept()
        for _, u in _ranked_units(g, scores[name], state[name]):
            if len(state[name]) + len(u) > round(f * g.n):
                break
            try_remove(g, u, None)
        return total - masks.kept() - before, lambda: restore(snap)

    def loss() -> float:
        for k, p in params.items():
            p.copy_(saved[k] * masks.t[k].to(p.dtype))
        return val_loss(model, batches)

    start = snapshot()
    current = {g.name: len(state[g.name]) / g.n for g in pool}
    try:
        return greedy_plan(list(groups_by_name), current, trial, loss, goal - (total - masks.kept()))
    finally:
        restore(start)
        for k, p in params.items():
            p.copy_(saved[k])


# -- physical pruning ------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(example)
    finally:
        model.train(was)


def _apply_structure(model: nn.Module, example: torch.Tensor, kept: dict[str, list[int]]) -> None:
    """Remove every channel not in ``kept`` (Torch-Pruning), then every head not kept (the attention
    module becomes a :class:`HeadPrunedAttention`)."""
    channels = {k: v for k, v in kept.items() if not k.endswith(HEADS)}
    if channels:
        dg = build_graph(model, example)
        for name, keep in channels.items():
            module = model.get_submodule(name)
            pruner = dg.get_pruner_of_module(module)
            n = pruner.get_out_channels(module)
            drop = sorted(set(range(n)) - {int(c) for c in keep})
            if drop:
                dg.get_pruning_group(module, pruner.prune_out_channels, drop).prune(record_history=False)
    for key, keep in kept.items():
        if not key.endswith(HEADS):
            continue
        name = key.removesuffix(HEADS)
        m = model.get_submodule(name)
        if len(keep) < m.num_heads:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    HeadPrunedAttention.from_attention(m, [int(h) for h in keep]))  # fmt: skip


def physically_prune(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> dict[str, list[int]]:
    """Remove every masked channel and head in place, drop all masks; return the kept indices per
    group (``{root layer or "<attention>:heads": [kept, ...]}``, plain ints: weights_only-serializable).

    Checks that the smaller model computes what the masked one did on ``example`` (in eval mode)."""
    _remember_dense_params(model)
    before = _logits(model, example)
    kept = {}
    for g in groups(model, example):
        pruned = set(pruned_channels(g))
        if pruned:
            kept[g.name] = [c for c in range(g.n) if c not in pruned]
    strip_masks(model)
    _apply_structure(model, example, kept)
    check_same_logits(
        before, _logits(model, example), atol, "physically pruned model differs from the masked one"
    )
    return kept


def check_same_logits(before: torch.Tensor, after: torch.Tensor, atol: float, what: str) -> None:
    """``RuntimeError`` (``what``, with the largest difference) unless ``after`` matches ``before``
    within ``atol`` relative to the largest logit (at least 1)."""
    diff = float((after - before).abs().max()) if after.shape == before.shape else math.inf
    if not diff <= atol * max(1.0, float(before.abs().max())):
        raise RuntimeError(f"{what} (max abs logit diff {diff:.3g})")


def restore_structure(model: nn.Module, structure: dict[str, list[int]], example: torch.Tensor) -> None:
    """Give a freshly built full-size ``model`` the channel structure ``physically_prune`` returned,
    so that the pruned state dict loads into it."""
    _remember_dense_params(model)
    strip_masks(model)
    _apply_structure(model, example, dict(structure or {}))


def _remember_dense_params(model: nn.Module) -> None:
    """Keep the full-size model's prunable weight count on it (once, before any channel goes), so that
    :func:`qpexp.core.accounting.pruned_fraction` counts the removed channels as pruned."""
    from qpexp.core.accounting import DENSE_PARAMS_ATTR, prunable_params

    if getattr(model, DENSE_PARAMS_ATTR, None) is None:
        setattr(model, DENSE_PARAMS_ATTR, prunable_params(model))


# -- the check before training ----------------------------------------------------------------------
def _members(g: Group) -> str:
    mods = []
    for sl in g.slices:
        for module, *_ in sl:
            if module not in mods:
                mods.append(module)
    return ", ".join(type(m).__name__ for m in mods[:6]) + (", ..." if len(mods) > 6 else "")


def _trial(model: nn.Module, example: torch.Tensor, grps: list[Group], frac: float = 0.25) -> str | None:
    """Mask the weakest ``frac`` of the units of each group in ``grps`` (random scores), remove them:
    None when the smaller model computes the masked model's logits, else what went wrong."""
    gen = torch.Generator().manual_seed(0)
    masks = _Masks(model, grps)
    for g in grps:
        units = [g.units[i] for i in torch.randperm(len(g.units), generator=gen).tolist()]
        budget = max(1, int(frac * g.n)) if g.n > 1 else 0
        removed = 0
        for u in units:
            if removed + len(u) > budget or g.n - removed - len(u) < 1:
                continue
            masks.remove([s for c in u for s in g.slices[c]])
            removed += len(u)
    masks.write()
    try:
        physically_prune(model, example, atol=1e-4)
    except Exception as e:  # noqa: BLE001 - any failure of the removal is the finding
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return None


def dry_run(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Check, on ``model`` (a copy: it is modified), that channel pruning can handle it: analyse the
    groups, remove a quarter of every group's units and compare with the masked logits. Raises
    :class:`ChannelPruningError` naming the module(s) it cannot prune; returns the groups left
    unpruned by design with the reason."""
    pristine = copy.deepcopy(model)
    try:
        plan = analyse(model, example)
    except ChannelPruningError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing failures of any kind
        raise ChannelPruningError(
            f"the model cannot be traced for channel pruning: {type(e).__name__}: {e}"
        ) from None
    if not any(len(g.units) > 1 for g in plan.groups):
        why = [f"'{k}': {v}" for k, v in plan.frozen.items()]
        why += [f"'{g.name}' has a single removable unit of {g.n} channel(s)" for g in plan.groups]
        raise ChannelPruningError(
            f"no channel of the model can be removed ({'; '.join(why) or 'no conv/linear layer feeds another'})"
        )
    if _trial(model, example, plan.groups) is None:
        return plan.frozen
    bad = []
    for i, g in enumerate(plan.groups):  # find the group(s) that break, one at a time
        trial = copy.deepcopy(pristine)
        err = _trial(trial, example, [analyse(trial, example).groups[i]])
        if err is not None:
            bad.append(f"'{g.name}' (coupled: {_members(g)}): {err}")
    what = "; ".join(bad) if bad else "removing channels of several groups together changes the logits"
    raise ChannelPruningError(f"cannot remove the channels of {what}")


__all__ = [
    "ChannelPruningError",
    "Group",
    "Plan",
    "analyse",
    "channel_prune_step",
    "check_same_logits",
    "dry_run",
    "group_scores",
    "groups",
    "physically_prune",
    "pruned_channels",
    "restore_structure",
]
