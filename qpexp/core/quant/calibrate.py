"""Layer-wise calibration for one-shot compression: each weight's input statistics on a few batches.

One-shot methods (GPTQ, SparseGPT, Wanda) compress a weight ``W`` (``rows x d``, a conv's weight
flattened to ``out x (in/groups * kernel)``) from its inputs ``X`` (``n x d``: the rows a linear
layer multiplies, or a conv's unfolded patches, :func:`input_rows`) without labels:

* ``hessian``: ``sum_n x x^T`` per group of a grouped conv (``groups x d x d``, float64), the
  proxy Hessian of the layer-wise squared output error (GPTQ and SparseGPT take ``hessian / count``);
* ``sq_norms``: ``sum_n x_j^2`` per input column (``groups x d``): Wanda's ``||X_j||_2^2``.

:func:`calibrate_` walks the model's weights (:func:`sites`: every conv/linear layer, its
quantization wrapper's input quantizer applied, self-attention's packed ``in_proj_weight``, and the
raw weights quantized in the graph that the quantization pass linked to the input of their single
``F.linear``, :class:`~qpexp.core.quant.graph.LinearInput`: their inputs are that input quantizer's
outputs, hooked on the quantizer itself) in forward order and hands each weight's statistics to a
callback that compresses it.
``sequential=True`` (the papers' order) measures each weight's inputs on the model whose earlier
weights are already compressed: one pass over the batches per weight. ``sequential=False`` measures
every weight in one pass on the uncompressed model, then compresses them all (cheaper, and the
inputs do not see the earlier layers' errors). ``nn.MultiheadAttention`` is switched to its traceable
forward for the duration (so that ``out_proj`` is called as a module and can be observed), then back.

Imports only torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.modules import CONV, CONV_LINEAR
from qpexp.core.quant.traceable import TRACEABLE, _supported


@dataclass
class Site:
    """One weight to compress: ``getattr(owner, pname)``; its inputs are the first positional
    argument of ``hook``'s forward (after ``aq``, the input quantizer, when quantized), or, when
    ``hook`` is ``aq`` itself, that quantizer's outputs."""

    name: str
    owner: nn.Module  # the conv/linear layer (or the attention module for ``in_proj_weight``)
    pname: str
    hook: nn.Module
    aq: nn.Module | None = None
    wq: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.pname)

    @property
    def groups(self) -> int:
        return getattr(self.owner, "groups", 1) if isinstance(self.owner, CONV) else 1


@dataclass
class LayerStats:
    count: int = 0
    hessian: torch.Tensor | None = None  # (groups, d, d) sum of x x^T
    sq_norms: torch.Tensor | None = None  # (groups, d) sum of x_j^2
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def mean_hessian(self) -> torch.Tensor:
        return self.hessian / max(self.count, 1)

    def input_norms(self) -> torch.Tensor:
        """Wanda's ``||X_j||_2`` per input column, ``(groups, d)``."""
        return self.sq_norms.sqrt()


def _conv_padded(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``x`` padded as the conv pads it, and the padding left for unfold (0 once applied here)."""
    nd = layer.weight.dim() - 2
    pad = layer.padding
    if isinstance(pad, str):  # 'valid' or 'same' (torch: left = total // 2, right = the rest)
        if pad == "valid":
            return x, (0,) * nd
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        lr = []
        for t in reversed(total):
            lr += [t // 2, t - t // 2]
        return F.pad(x, lr), (0,) * nd
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0,) * nd
    return x, tuple(pad)


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``layer``'s weight multiplies, ``(groups, n, d)``: a linear layer's inputs, or a
    conv's patches (``F.unfold``; columns ordered as ``weight.reshape(out, -1)``), so that a group's
    output is ``rows @ W_g^T``. Conv1d goes through a 2-d unfold of height 1; Conv3d is refused."""
    if not isinstance(layer, CONV):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    if isinstance(layer, nn.Conv3d):
        raise ValueError("one-shot calibration: Conv3d inputs cannot be unfolded (torch has no 3-d unfold)")
    x, pad = _conv_padded(layer, x)
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        one = lambda t: (1, t[0])  # noqa: E731
        k, d, p, s = one(layer.kernel_size), one(layer.dilation), (0, pad[0]), one(layer.stride)
    else:
        k, d, p, s = layer.kernel_size, layer.dilation, pad, layer.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C * K, L)
    g = layer.groups
    rows = cols.transpose(1, 2).reshape(-1, g, cols.shape[1] // g)
    return rows.transpose(0, 1)


def _raw_sites(name: str, m: nn.Module) -> list[Site]:
    """``m``'s raw weights quantized in the graph whose product the pass linked to its input
    (``<param>_wq`` with a :class:`~qpexp.core.quant.graph.LinearInput`, a single ``F.linear`` on
    the whole quantized weight): their inputs are those of that call, through its input quantizer
    (hooked itself), or attention's ``query`` when that call has no input quantizer."""
    out = []
    for pname, p in m._parameters.items():
        wq = m._modules.get(f"{pname}_wq")
        link = getattr(wq, "_qpexp_linear_input", None) if wq is not None else None
        if p is None or link is None or p.dim() != 2 or getattr(wq, "ch_axis", 0) != 0:
            continue
        full = f"{name}.{pname}" if name else pname
        if link.quantizer is not None:
            out.append(Site(full, m, pname, link.quantizer, link.quantizer, wq))
        elif isinstance(m, nn.MultiheadAttention) and pname == "in_proj_weight":
            out.append(Site(full, m, pname, m, None, wq))
    return out


def sites(model: nn.Module) -> list[Site]:
    """Every weight one-shot methods compress, in module order (not yet forward order)."""
    out, wrapped = [], set()
    for name, m in model.named_modules():
        inner = getattr(m, "layer", None)
        if isinstance(inner, CONV_LINEAR) and hasattr(m, "wq") and hasattr(m, "aq"):  # QuantLayer
            out.append(Site(name, inner, "weight", m, m.aq, m.wq))
            wrapped.add(id(inner))
        elif isinstance(m, CONV_LINEAR) and id(m) not in wrapped:
            out.append(Site(name, m, "weight", m))
        else:
            raw = _raw_sites(name, m)
            out += raw
            if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
                if not any(s.pname == "in_proj_weight" for s in raw):
                    out.append(Site(f"{name}.in_proj_weight", m, "in_proj_weight", m))
    return out


def _accumulate(
    site: Site, stats: LayerStats, x: torch.Tensor, hessian: bool, quantized: bool = False
) -> None:
    start = time.perf_counter()
    x = x.detach()
    if site.aq is not None and not quantized:
        x = site.aq(x)
    layer = site.owner if isinstance(site.owner, CONV_LINEAR) and site.pname == "weight" else None
    rows = input_rows(layer, x) if layer is not None else x.reshape(-1, x.shape[-1]).unsqueeze(0)
    rows = rows.double()
    stats.count += rows.shape[1]
    sq = rows.pow(2).sum(1)
    stats.sq_norms = sq if stats.sq_norms is None else stats.sq_norms + sq
    if hessian:
        h = rows.transpose(1, 2) @ rows
        stats.hessian = h if stats.hessian is None else stats.hessian + h
    stats.seconds += time.perf_counter() - start


def _hook(site: Site, stats: LayerStats, hessian: bool):
    if site.hook is site.aq:  # hooked on the input quantizer itself: its output is what is multiplied

        def post(mod, args, out):
            _accumulate(site, stats, out, hessian, quantized=True)

        return site.hook.register_forward_hook(post)

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["query"]
        if isinstance(site.hook, nn.MultiheadAttention):  # self-attention only: q, k and v the same tensor
            rest = list(args[1:3]) + [kwargs.get(k) for k in ("key", "value") if k in kwargs]
            if any(r is not x for r in rest):
                raise ValueError(f"one-shot calibration of {site.name}: only self-attention (q = k = v)")
        _accumulate(site, stats, x, hessian)

    return site.hook.register_forward_pre_hook(pre, with_kwargs=True)


@torch.no_grad()
def _run(model: nn.Module, batches) -> float:
    start = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - start


def forward_order(model: nn.Module, example: torch.Tensor, found: list[Site]) -> list[Site]:
    """``found`` in the order the model first uses them on ``example`` (unused ones are dropped)."""
    order: list[int] = []
    hooks = [
        s.hook.register_forward_pre_hook(lambda mod, a, i=i: order.append(i) if i not in order else None)
        for i, s in enumerate(found)
    ]
    try:
        _run(model, [example])
    finally:
        for h in hooks:
            h.remove()
    return [found[i] for i in order]


class _Traceable:
    """``nn.MultiheadAttention`` with its plain-op forward (``out_proj`` called as a module) inside."""

    def __init__(self, model: nn.Module):
        self.switched = []
        for m in model.modules():
            new = TRACEABLE.get(type(m))
            if new is not None and _supported(m):
                self.switched.append((m, type(m)))
                m.__class__ = new

    def restore(self) -> None:
        for m, cls in self.switched:
            m.__class__ = cls


def calibrate_(model: nn.Module, batches: list[torch.Tensor], compress, sequential: bool = True,
               hessian: bool = True, names=None) -> dict:  # fmt: skip
    """Call ``compress(site, stats)`` for every weight of ``model`` in forward order (``names``: only
    those), its :class:`LayerStats` measured on ``batches`` (inputs only, no labels), sequentially
    or in one pass (see the module doc). The model runs in eval mode and is left in its mode.

    Returns ``{"layers": {name: {"calib_seconds", "compress_seconds", "stats_bytes", **returned}},
    "calib_seconds", "compress_seconds", "forward_seconds"}`` (``forward_seconds``: one plain
    forward pass over ``batches``, the yardstick for the calibration passes).
    """
    if not batches:
        raise ValueError("one-shot calibration needs at least one calibration batch (calib_batches)")
    was = model.training
    model.eval()
    tr = _Traceable(model)
    out: dict = {"layers": {}, "calib_seconds": 0.0, "compress_seconds": 0.0}
    try:
        found = [s for s in sites(model) if names is None or s.name in names]
        order = forward_order(model, batches[0], found)
        out["forward_seconds"] = _run(model, batches)
        groups = [[s] for s in order] if sequential else [order]
        for group in groups:
            stats = {s.name: LayerStats() for s in group}
            hooks = [_hook(s, stats[s.name], hessian) for s in group]
            try:
                seconds = _run(model, batches)
            finally:
                for h in hooks:
                    h.remove()
            out["calib_seconds"] += seconds
            for s in group:
                start = time.perf_counter()
                info = compress(s, stats[s.name]) or {}
                took = time.perf_counter() - start
                out["compress_seconds"] += took
                st = stats[s.name]
                nbytes = sum(t.numel() * t.element_size() for t in (st.hessian, st.sq_norms) if t is not None)
                out["layers"][s.name] = {"calib_seconds": seconds if sequential else st.seconds,
                                         "compress_seconds": took, "stats_bytes": nbytes, **info}  # fmt: skip
    finally:
        tr.restore()
        model.train(was)
    return out
