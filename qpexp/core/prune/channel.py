"""Channel pruning: whole output channels of conv layers and neurons of linear layers.

Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds, for each prunable root layer, the
group of parameters coupled to its output channels: the root's weight rows and bias, the following
BatchNorm's affine parameters and the next layer's input columns (through flatten/reshape too).

* During fine-tuning a pruned channel is **masked**: every coupled slice gets a zero in a
  ``<param>_mask`` buffer (``weight_mask``, ``bias_mask``) that :class:`MaskKeeper` re-applies after
  each optimizer step. The channel's output is then exactly zero and the next layer ignores it.
* :func:`physically_prune` removes the masked channels with Torch-Pruning (the model becomes smaller
  and computes the same outputs); it returns the kept channel indices per root layer, which
  :func:`restore_structure` replays on a freshly built model before its state dict is loaded.

``ratio`` is the fraction of prunable **parameters** (conv/linear weights) removed, counting the
coupled removals: a channel of layer ``l`` takes its row of ``l`` and its columns of ``l+1``. Channels
are removed one by one in the scope's order; the step stops at the channel count whose removed
parameter count is closest to the target (exact counts, realized sparsity returned per layer).

Channel scores are the criterion on the root layer's output slice (``criterion(target, dim=0)``: the
filter's L1/L2 norm, its Taylor estimate ``(sum g w)^2``, FPGM distance, or random).

* ``scope=layer``: every group loses the same fraction ``f`` of its channels (``round(f n)`` each):
  channels are interleaved by the fraction at which they go, ``(j + 1/2) / n``, so all layers
  advance together until the parameter target is met.
* ``scope=global``: one ranking across layers on **per-layer normalised scores**: each channel's
  score divided by the mean score of its layer's remaining channels. Raw scores are not comparable
  across layers, and not in one consistent way: filter norms grow with fan-in and with the layer's
  weight scale (a 5-tap first conv vs a 75-input conv), Taylor estimates differ by orders of
  magnitude between layers, FPGM distances grow with filter size. Dividing by the layer mean makes
  every criterion dimensionless (1 = an average channel of its layer), so the global ranking
  removes channels that are weak *relative to their layer* and prunes more where a layer's scores
  are spread (a few strong channels, many weak ones). This is also Torch-Pruning's default
  (``normalizer='mean'``). The parameter cost of each channel enters through the exact count that
  decides where to stop, not through the ranking.

No group keeps fewer than ``min_keep_channels`` channels and no layer keeps fewer than
``keep_minimum(n, min_keep_frac)`` of its weights, so no layer is ever emptied. The final classifier
(a layer whose outputs reach the model output) is never a root: its outputs are the classes.

Supported: conv/linear (groups=1), BatchNorm, any parameter-free op Torch-Pruning traces (ReLU,
pooling, flatten, residual adds). Normalisations across channels (LayerNorm, GroupNorm) would not
give the same outputs once channels are removed and raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qpexp.core.modules import CONV, CONV_LINEAR
from qpexp.core.prune.criteria import Target
from qpexp.core.prune.masks import prunable_layers, strip_masks
from qpexp.core.prune.unstructured import keep_minimum


@dataclass
class Group:
    """One root layer's output channels and every parameter slice coupled to each channel."""

    name: str
    root: nn.Module
    n: int
    # per channel: (module, param name, dim, indices)
    slices: list[list[tuple[nn.Module, str, int, torch.Tensor]]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # prunable layer names whose weights it changes


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


def _param_slices(module, handler_name: str) -> list[tuple[str, int]]:
    """Which parameters of ``module`` a Torch-Pruning handler slices, and along which dim."""
    if isinstance(module, CONV_LINEAR):
        if isinstance(module, CONV) and module.groups != 1:
            raise NotImplementedError(f"channel pruning of grouped convolutions ({module}) is not supported")
        if "out" in handler_name:
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 1)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [(p, 0) for p in ("weight", "bias") if getattr(module, p, None) is not None]
    if isinstance(module, nn.Module) and not any(True for _ in module.parameters(recurse=False)):
        return []
    raise NotImplementedError(
        f"channel pruning through {type(module).__name__} is not supported: removing channels would not "
        "give the same outputs as masking them"
    )


def groups(model: nn.Module, example: torch.Tensor, graph=None) -> list[Group]:
    """Every prunable channel group of ``model``, ordered by the root layer's position in the model."""
    tp = _tp()
    dg = graph or build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    layer_names = {id(m): n for n, m in prunable_layers(model)}
    order = {n: i for i, n in enumerate(names.values())}
    out = []
    for g in dg.get_all_groups(root_module_types=CONV_LINEAR):
        root = g[0].dep.target.module
        members = [it.dep.target for it in g if dg.is_out_channel_pruning_fn(it.dep.handler)]
        if any(isinstance(nd.module, CONV_LINEAR) and _feeds_output(nd) for nd in members):
            continue  # the classifier (or a layer coupled to it): its outputs are the model's outputs
        n = dg.get_out_channels(root)
        grp = Group(names[root], root, n, [[] for _ in range(n)])
        for it in g:
            module = it.dep.target.module
            if it.dep.target.type == tp.ops.OPTYPE.PARAMETER:
                raise NotImplementedError("channel pruning of bare nn.Parameter tensors is not supported")
            specs = _param_slices(module, getattr(it.dep.handler, "__name__", ""))
            if not specs:
                continue
            idxs = torch.as_tensor(list(it.idxs), dtype=torch.long)
            roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
            for c in range(n):
                sel = idxs[roots == c]
                if sel.numel():
                    for pname, dim in specs:
                        grp.slices[c].append((module, pname, dim, sel))
            for pname, _ in specs:
                if pname == "weight" and id(module) in layer_names:
                    grp.touched.add(layer_names[id(module)])
        out.append(grp)
    out.sort(key=lambda grp: order[grp.name])
    return out


# -- masks ----------------------------------------------------------------------------------------
class _Masks:
    """Working copies of every coupled parameter's mask (and every prunable weight's, for counting)."""

    def __init__(self, model: nn.Module, grps: list[Group]):
        self.t: dict[tuple[int, str], torch.Tensor] = {}
        self.owner: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for _, m in prunable_layers(model):
            self._add(m, "weight")
        self.coupled: set[tuple[int, str]] = set()  # the masks written: parameters in some group
        for g in grps:
            for sl in g.slices:
                for module, pname, _, _ in sl:
                    self._add(module, pname)
                    self.coupled.add((id(module), pname))
        self.layers = [(n, self.t[(id(m), "weight")]) for n, m in prunable_layers(model)]
        self.layer_of = {(id(m), "weight"): n for n, m in prunable_layers(model)}
        self.alive = {n: int(t.sum()) for n, t in self.layers}  # kept weights per prunable layer

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
        """Zero a channel's slices (counting each weight once); returns what is needed to undo it."""
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
            self.t[key].index_copy_(dim, idx, old)
            if key in self.layer_of:
                self.alive[self.layer_of[key]] += int(old.sum())

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


def pruned_channels(g: Group, masks: _Masks | None = None) -> list[int]:
    """Channels of ``g`` already pruned: their row of the root's weight mask is all zero."""
    t = masks.t[(id(g.root), "weight")] if masks is not None else getattr(g.root, "weight_mask", None)
    if t is None:
        return []
    return [c for c in range(g.n) if not bool(t[c].any())]


# -- one pruning step ------------------------------------------------------------------------------
def _own_ratios(grps: list[Group], model: nn.Module, cfg, target: float) -> dict[str, float]:
    """Groups with their own ratio: the first layer's (``first_ratio``) and the group(s) feeding the
    last layer (``last_ratio``), scaled by the schedule's progress. A ratio r removes round(r n) of the
    group's channels, i.e. a fraction r of that first/last layer's weights."""
    from qpexp.core.prune import layer_ratios

    names = [n for n, _ in prunable_layers(model)]
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


def _ranked(g: Group, scores: torch.Tensor, pruned: set[int]) -> list[int]:
    alive = [c for c in range(g.n) if c not in pruned]
    return sorted(alive, key=lambda c: float(scores[c]))  # stable: ties keep channel order


@torch.no_grad()
def channel_prune_step(
    model: nn.Module,
    cfg,
    target: float,
    criterion=None,
    grads: dict[str, list[torch.Tensor]] | None = None,
    example: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mask whole channels so that a fraction ``target`` of prunable weights is removed (as closely
    as channels allow). Already-pruned channels stay pruned. Returns each layer's realized sparsity."""
    from qpexp.core.prune import make_criterion

    if example is None:
        raise ValueError("channel pruning traces the model: pass an example input (example=...)")
    criterion = criterion or make_criterion(cfg)
    grps = groups(model, example)
    masks = _Masks(model, grps)
    layer_n = {n: t.numel() for n, t in masks.layers}
    total = sum(layer_n.values())
    goal = round(target * total)

    state = {g.name: set(pruned_channels(g, masks)) for g in grps}
    scores = {}
    for g in grps:
        s = criterion(Target(g.name, g.root.weight, (grads or {}).get(g.name, [])), dim=0).float()
        scores[g.name] = s

    min_ch = {g.name: min(g.n, max(cfg.min_keep_channels, 1)) for g in grps}

    def try_remove(g: Group, c: int, limit: int | None) -> str:
        """Remove channel c of g: 'ok', 'skip' (would empty a layer) or 'stop' (past the target)."""
        if g.n - len(state[g.name]) <= min_ch[g.name]:
            return "skip"
        before = total - masks.kept()
        undo = masks.remove(g.slices[c])
        for name in g.touched:
            if masks.alive[name] < keep_minimum(layer_n[name], cfg.min_keep_frac):
                masks.undo(undo)
                return "skip"
        after = total - masks.kept()
        if limit is not None:
            if after > limit and after - limit >= limit - before:
                masks.undo(undo)  # stopping before this channel is at least as close to the target
                return "stop"
        state[g.name].add(c)
        return "ok" if limit is None or after < limit else "stop"

    # groups with their own ratio (first/last layer): a channel count of their own
    own = _own_ratios(grps, model, cfg, target)
    for g in grps:
        if g.name not in own:
            continue
        want = min(round(own[g.name] * g.n), g.n)
        for c in _ranked(g, scores[g.name], state[g.name]):
            if len(state[g.name]) >= want:
                break
            try_remove(g, c, None)

    # the shared pool fills the remaining parameter budget, in the scope's order
    pool = [g for g in grps if g.name not in own]
    order = []
    for gi, g in enumerate(pool):
        ranked = _ranked(g, scores[g.name], state[g.name])
        if cfg.scope == "global":
            alive = scores[g.name][ranked] if ranked else torch.zeros(1)
            mean = float(alive.mean())
            keys = [float(scores[g.name][c]) / mean if mean > 0 else float(scores[g.name][c]) for c in ranked]
        else:  # layer: the group's removed fraction at which this channel goes (round to nearest)
            p = len(state[g.name])
            keys = [(p + j + 0.5) / g.n for j in range(len(ranked))]
        order += [(k, gi, j, g, c) for j, (k, c) in enumerate(zip(keys, ranked))]
    order.sort(key=lambda t: t[:3])
    if total - masks.kept() < goal:
        for _, _, _, g, c in order:
            if try_remove(g, c, goal) == "stop":
                break
    masks.write()
    return {name: (layer_n[name] - masks.alive[name]) / layer_n[name] for name, _ in masks.layers}


# -- physical pruning ------------------------------------------------------------------------------
@torch.no_grad()
def _logits(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(example)
    finally:
        model.train(was)


def _prune_groups(model: nn.Module, example: torch.Tensor, kept: dict[str, list[int]]) -> None:
    dg = build_graph(model, example)
    for name, keep in kept.items():
        module = model.get_submodule(name)
        pruner = dg.get_pruner_of_module(module)
        n = pruner.get_out_channels(module)
        drop = sorted(set(range(n)) - {int(c) for c in keep})
        if drop:
            dg.get_pruning_group(module, pruner.prune_out_channels, drop).prune(record_history=False)


def physically_prune(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> dict[str, list[int]]:
    """Remove every masked channel in place (Torch-Pruning), drop all masks; return the kept channel
    indices per root layer (``{layer: [kept, ...]}``, plain ints: weights_only-serializable).

    Checks that the smaller model computes what the masked one did on ``example`` (in eval mode)."""
    _remember_dense_params(model)
    before = _logits(model, example)
    grps = groups(model, example)
    kept = {}
    for g in grps:
        pruned = set(pruned_channels(g))
        if pruned:
            kept[g.name] = [c for c in range(g.n) if c not in pruned]
    strip_masks(model)
    _prune_groups(model, example, kept)
    after = _logits(model, example)
    diff = float((after - before).abs().max()) if after.shape == before.shape else math.inf
    if diff > atol * max(1.0, float(before.abs().max())):
        raise RuntimeError(
            f"physically pruned model differs from the masked one (max abs logit diff {diff:.3g})"
        )
    return kept


def restore_structure(model: nn.Module, structure: dict[str, list[int]], example: torch.Tensor) -> None:
    """Give a freshly built full-size ``model`` the channel structure ``physically_prune`` returned,
    so that the pruned state dict loads into it."""
    _remember_dense_params(model)
    strip_masks(model)
    _prune_groups(model, example, dict(structure or {}))


def _remember_dense_params(model: nn.Module) -> None:
    """Keep the full-size model's prunable weight count on it (once, before any channel goes), so that
    :func:`qpexp.core.accounting.pruned_fraction` counts the removed channels as pruned."""
    from qpexp.core.accounting import DENSE_PARAMS_ATTR, prunable_params

    if getattr(model, DENSE_PARAMS_ATTR, None) is None:
        setattr(model, DENSE_PARAMS_ATTR, prunable_params(model))


__all__ = ["channel_prune_step", "physically_prune", "restore_structure", "groups", "Group"]
