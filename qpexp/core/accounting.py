"""Honest counts, computed from the tensors: sparsity, parameters, storage bits, MACs and BOPs.

Storage of one weight tensor that is pruned or quantized, with ``n`` weights, ``nnz`` nonzeros
(counted after quantization) at ``b`` bits, is the cheapest of three formats plus a 2-bit flag
saying which one was used::

    dense     n * b
    bitmask   nnz * b + n                     (1 bit per position)
    relative  (nnz + pad) * (b + 4)           (Deep Compression: 4-bit gaps, a filler entry per
                                               16-position run without a nonzero)

Every scale and stored zero point costs 32 bits (a symmetric quantizer's Z = 0 is implicit); every
tensor left in float (biases, BatchNorm, unpruned float weights) costs 32 bits per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qpexp.core.prune.masks import PRUNABLE, get_mask

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

    @property
    def bits_w(self) -> int:
        return self.wq.bits if self.wq is not None else FLOAT_BITS

    @property
    def bits_a(self) -> int:
        return self.aq.bits if self.aq is not None else FLOAT_BITS

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the model computes with: masked, and fake-quantized if quantized."""
        w = self.layer.weight.detach()
        if self.wq is None:
            return w
        was = self.wq.training
        self.wq.eval()
        try:
            return self.wq(w).detach()
        finally:
            self.wq.train(was)


def layer_views(model: nn.Module) -> list[LayerView]:
    """Every conv/linear layer with its weight and input quantizers (None when in float)."""
    views, wrapped = [], set()
    for name, m in model.named_modules():
        if hasattr(m, "wq") and hasattr(m, "aq") and isinstance(getattr(m, "layer", None), PRUNABLE):
            views.append(LayerView(name, m.layer, m.wq, m.aq, m))
            wrapped.add(id(m.layer))
        elif isinstance(m, PRUNABLE) and id(m) not in wrapped:
            views.append(LayerView(name, m, None, None, m))
    return views


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
    total, rows, counted = 0, {}, set()
    for v in layer_views(model):
        w = v.effective_weight()
        compressed = v.wq is not None or get_mask(v.layer) is not None
        if compressed:
            t = tensor_bits(w, v.bits_w)
        else:
            t = {
                "bits": w.numel() * FLOAT_BITS,
                "format": "float",
                "n": w.numel(),
                "nnz": int(w.count_nonzero()),
            }
        qbits = _quantizer_bits(v.wq) + _quantizer_bits(v.aq)
        bias = v.layer.bias.numel() * FLOAT_BITS if v.layer.bias is not None else 0
        rows[v.name] = {**t, "weight_bits": t["bits"], "qparam_bits": qbits, "bias_bits": bias}
        total += t["bits"] + qbits + bias
        counted.update({id(v.layer.weight), id(v.layer.bias)})
    counted.update(id(p) for n, p in model.named_parameters() if ".wq." in n or ".aq." in n)
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    other += sum(b.numel() for n, b in model.named_buffers() if _is_model_state_buffer(n))
    total += other * FLOAT_BITS
    if detail:
        return total, rows, other * FLOAT_BITS
    return total


def _is_model_state_buffer(name: str) -> bool:
    """Buffers the model needs at inference (BatchNorm statistics), not masks or observer state."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("running_mean", "running_var")


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights (conv/linear) that are exactly zero in the model's weights."""
    zeros = total = 0
    for v in layer_views(model):
        zeros += int((v.layer.weight == 0).sum())
        total += v.layer.weight.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def layer_sparsity(model: nn.Module) -> dict[str, float]:
    return {v.name: float((v.layer.weight == 0).float().mean()) for v in layer_views(model)}


@torch.no_grad()
def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) model parameters, quantizer step sizes excluded."""
    total = nonzero = 0
    for name, p in model.named_parameters():
        if ".wq." in name or ".aq." in name:
            continue
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


@torch.no_grad()
def model_macs(model: nn.Module, example: torch.Tensor) -> dict:
    """Dense MACs per sample of every conv/linear layer, total MACs and BOPs.

    BOPs = sum over layers of MACs x weight bits x input activation bits (32 when in float).
    Unstructured zeros do not reduce MACs (no sparse kernel is assumed); physically removed
    channels do.
    """
    views = {id(v.owner): v for v in layer_views(model)}
    per_layer: dict[str, int] = {}
    hooks = []

    def hook(mod, inp, out):
        v = views[id(mod)]
        mod = v.layer
        if isinstance(mod, nn.Linear):
            macs = mod.in_features * mod.out_features
        else:
            k = int(torch.tensor(mod.kernel_size).prod())
            macs = (out[0].numel()) * (mod.in_channels // mod.groups) * k
        per_layer[v.name] = int(macs)

    for v in views.values():
        hooks.append(v.owner.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    bops = 0
    for v in views.values():
        bops += per_layer.get(v.name, 0) * v.bits_w * v.bits_a
    return {"macs": sum(per_layer.values()), "bops": bops, "layers": per_layer}
