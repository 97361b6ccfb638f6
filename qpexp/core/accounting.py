"""Honest counts, computed from the tensors: sparsity, parameters, storage bits, MACs and BOPs.

Storage of one weight tensor that is pruned or quantized, with ``n`` weights, ``nnz`` nonzeros
(counted after quantization) at ``b`` bits, is the cheapest of three formats plus a 2-bit flag
saying which one was used::

    dense     n * b
    bitmask   nnz * b + n                     (1 bit per position)
    relative  (nnz + pad) * (b + 4)           (Deep Compression: 4-bit gaps, a filler entry per
                                               16-position run without a nonzero)

Every scale and stored zero point costs 32 bits (a symmetric quantizer's Z = 0 is implicit), those of
the graph-level activation quantizers (adds, concatenations, matmuls, pooling) included; every
tensor left in float (biases, BatchNorm, LayerNorm, position embeddings, unpruned float weights)
costs 32 bits per element. A raw weight matrix quantized by ``quantize_`` (attention
``in_proj_weight``) is counted like a layer's weight, at its bit width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qpexp.core.prune.masks import PRUNABLE, get_mask, is_raw_weight

FLOAT_BITS = 32
INDEX_BITS = 4
FLAG_BITS = 2


@dataclass
class LayerView:
    name: str
    layer: nn.Module
    wq: nn.Module | None
    aq: nn.Module | None
    owner: nn.Module  # the module whose forward computes this layer (a quantization wrapper or the layer)
    param: str = "weight"  # the weight's parameter name on ``layer`` (``in_proj_weight`` for attention)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.layer, self.param)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias added to this weight's product (``in_proj_bias`` for ``in_proj_weight``)."""
        return getattr(self.layer, self.param.replace("weight", "bias"), None)

    @property
    def bits_w(self) -> int:
        return self.wq.bits if self.wq is not None else FLOAT_BITS

    @property
    def bits_a(self) -> int:
        return self.aq.bits if self.aq is not None else FLOAT_BITS

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the model computes with: masked, and fake-quantized if quantized."""
        w = self.weight.detach()
        if self.wq is None:
            return w
        was = self.wq.training
        self.wq.eval()
        try:
            return self.wq(w).detach()
        finally:
            self.wq.train(was)


def layer_views(model: nn.Module) -> list[LayerView]:
    """Every conv/linear layer with its weight and input quantizers (None when in float), then every
    raw weight matrix (attention ``in_proj_weight``, ...; see :func:`prunable_weights`)."""
    views, wrapped = [], set()
    for name, m in model.named_modules():
        if hasattr(m, "wq") and hasattr(m, "aq") and isinstance(getattr(m, "layer", None), PRUNABLE):
            views.append(LayerView(name, m.layer, m.wq, m.aq, m))
            wrapped.add(id(m.layer))
        elif isinstance(m, PRUNABLE):
            if id(m) not in wrapped:
                views.append(LayerView(name, m, None, None, m))
        else:
            for pname, p in m._parameters.items():
                wq = getattr(m, f"{pname}_wq", None)  # set by quantize_ for raw weights
                wq = wq if _is_quantizer(wq) else None
                if p is not None and (is_raw_weight(pname, p) or wq is not None):
                    aq = getattr(wq, "_qpexp_input_q", None)  # the quantizer of the input it multiplies
                    views.append(LayerView(f"{name}.{pname}" if name else pname, m, wq, aq, m, pname))
    return views


def _is_quantizer(m) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "n_qparams") and hasattr(m, "int_repr")


def _quantizer_param_ids(model: nn.Module) -> set[int]:
    """Parameters of quantizers (learned step sizes): not model parameters."""
    return {id(p) for m in model.modules() if _is_quantizer(m) for p in m.parameters()}


def relative_index_padding(w: torch.Tensor, index_bits: int = INDEX_BITS) -> int:
    """Filler entries needed when gaps between nonzeros are stored in ``index_bits`` bits."""
    pos = torch.nonzero(w.reshape(-1)).reshape(-1)
    if pos.numel() == 0:
        return 0
    gaps = torch.diff(pos, prepend=torch.tensor([-1]))
    return int(((gaps - 1) // (2**index_bits)).sum())


def tensor_bits(w: torch.Tensor, bits: int) -> dict:
    """Storage of one compressed weight tensor: the cheapest format, plus the format flag."""
    n = w.numel()
    nnz = int(torch.count_nonzero(w))
    options = {
        "dense": n * bits,
        "bitmask": nnz * bits + n,
        "relative": (nnz + relative_index_padding(w)) * (bits + INDEX_BITS),
    }
    fmt = min(options, key=options.get)
    return {"bits": options[fmt] + FLAG_BITS, "format": fmt, "n": n, "nnz": nnz}


def _quantizer_bits(q: nn.Module | None) -> int:
    if q is None:
        return 0
    scales, zeros = q.n_qparams()
    return (scales + zeros) * FLOAT_BITS


def size_bits(model: nn.Module, detail: bool = False):
    """Total storage in bits of everything needed to run ``model`` (see the module docstring)."""
    total, rows, counted, counted_q = 0, {}, set(), set()
    for v in layer_views(model):
        w = v.effective_weight()
        compressed = v.wq is not None or get_mask(v.layer, v.param) is not None
        if compressed:
            t = tensor_bits(w, v.bits_w)
        else:
            t = {
                "bits": w.numel() * FLOAT_BITS,
                "format": "float",
                "n": w.numel(),
                "nnz": int(w.count_nonzero()),
            }
        qbits = sum(_quantizer_bits(q) for q in (v.wq, v.aq) if id(q) not in counted_q)
        counted_q.update({id(v.wq), id(v.aq)})
        bias = v.bias.numel() * FLOAT_BITS if v.bias is not None else 0
        rows[v.name] = {**t, "weight_bits": t["bits"], "qparam_bits": qbits, "bias_bits": bias}
        total += t["bits"] + qbits + bias
        counted.update({id(v.weight), id(v.bias)})
    counted.update(_quantizer_param_ids(model))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    other += sum(b.numel() for n, b in model.named_buffers() if _is_model_state_buffer(n))
    # graph-level activation quantizers (adds, concatenations, matmuls, pooling): their qparams
    graph_q = sum(
        _quantizer_bits(m) for m in _unique_modules(model) if _is_quantizer(m) and id(m) not in counted_q
    )
    total += other * FLOAT_BITS + graph_q
    if detail:
        return total, rows, other * FLOAT_BITS + graph_q
    return total


def _unique_modules(model: nn.Module):
    return list({id(m): m for m in model.modules()}.values())


def _is_model_state_buffer(name: str) -> bool:
    """Buffers the model needs at inference (BatchNorm statistics), not masks or observer state."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("running_mean", "running_var")


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights (conv/linear) that are exactly zero in the model's weights."""
    zeros = total = 0
    for v in layer_views(model):
        zeros += int((v.weight == 0).sum())
        total += v.weight.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    return {v.name: float((v.weight == 0).float().mean()) for v in layer_views(model)}


@torch.no_grad()
def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) model parameters, quantizer step sizes excluded."""
    total = nonzero = 0
    quant = _quantizer_param_ids(model)
    for name, p in model.named_parameters():
        if ".wq." in name or ".aq." in name or id(p) in quant:
            continue
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def _tokens(x: torch.Tensor, batch_first: bool) -> int:
    """Sequence length of one attention input: (N, L, E) if batch_first else (L, N, E); (L, E) unbatched."""
    return x.shape[1] if x.dim() == 3 and batch_first else x.shape[0]


def _attention_macs(mod: nn.Module, name: str, inp, views: dict, names: dict, per_layer: dict) -> None:
    """An attention module (``nn.MultiheadAttention`` or a head-pruned one, whose projections are
    linear layers): its raw input projections, its two attention matmuls (``<name>.matmul``) and, for
    ``nn.MultiheadAttention`` whose ``out_proj`` is never called as a module, the output projection."""
    first = bool(getattr(mod, "batch_first", False))
    lq, lk, lv = (_tokens(t, first) for t in inp[:3])
    tokens = {"in_proj_weight": lq + lk + lv, "q_proj_weight": lq, "k_proj_weight": lk, "v_proj_weight": lv}
    for pname, v in views.items():
        w = v.weight
        rows = w.shape[0] // 3 if pname == "in_proj_weight" else w.shape[0]  # packed q, k, v rows
        per_layer[v.name] = rows * w.shape[1] * tokens[pname]
    per_layer[f"{name}.matmul"] = 2 * lq * lk * mod.num_heads * mod.head_dim  # Q K^T and A V
    out = getattr(mod, "out_proj", None)
    if isinstance(mod, nn.MultiheadAttention) and id(out) in names:
        per_layer[names[id(out)]] = lq * out.in_features * out.out_features


ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@torch.no_grad()
def model_macs(model: nn.Module, example: torch.Tensor) -> dict:
    """Dense MACs per sample of every conv/linear layer and attention projection, total MACs and BOPs.

    A linear layer applied to tokens counts once per token. An attention module adds its two
    matmuls (``<name>.matmul``, not a weight layer: no BOPs). Other raw weight matrices (embedding
    tables) cost no MACs. BOPs = sum over layers of MACs x weight bits x input activation bits (32
    when in float). Unstructured zeros do not reduce MACs (no sparse kernel is assumed); physically
    removed channels do.
    """
    all_views = layer_views(model)
    owners: dict[int, dict[str, LayerView]] = {}
    for v in all_views:
        owners.setdefault(id(v.owner), {})[v.param] = v
    names = {id(v.layer): v.name for v in all_views if v.param == "weight"}
    module_names = {id(m): n for n, m in model.named_modules()}
    per_layer: dict[str, int] = {}

    attention = {
        id(m) for m in model.modules() if all(hasattr(m, a) for a in ("num_heads", "head_dim", "out_proj"))
    }

    def hook(mod, inp, out):
        vs = owners.get(id(mod), {})
        if "weight" not in vs:  # an attention module: its raw projections (if any) and its matmuls
            attn = {p: v for p, v in vs.items() if p in ATTENTION_WEIGHTS}
            if id(mod) in attention and len(inp) >= 3:
                _attention_macs(mod, module_names[id(mod)], inp, attn, names, per_layer)
            return
        v = vs["weight"]
        layer = v.layer
        if isinstance(layer, nn.Linear):
            macs = out[0].numel() * layer.in_features
        else:
            k = int(torch.tensor(layer.kernel_size).prod())
            macs = (out[0].numel()) * (layer.in_channels // layer.groups) * k
        per_layer[v.name] = int(macs)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if id(m) in owners or id(m) in attention]
    was = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    bops = 0
    for v in all_views:
        bops += per_layer.get(v.name, 0) * v.bits_w * v.bits_a
    return {"macs": sum(per_layer.values()), "bops": bops, "layers": per_layer}
