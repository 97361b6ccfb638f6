"""Honest counts, computed from the tensors: sparsity, parameters, storage bits, MACs and BOPs.

Storage of one weight tensor that is pruned or quantized, with ``n`` weights, ``nnz`` nonzeros
(counted after quantization) at ``b`` bits, is the cheapest of these formats plus the flag saying
which one was used (a prefix code: 2 bits for dense, bitmask and relative, 3 for rowcol and N:M)::

    dense     n * b
    bitmask   nnz * b + n                     (1 bit per position)
    relative  (nnz + pad) * (b + 4)           (Deep Compression: 4-bit gaps, a filler entry per
                                               16-position run without a nonzero)
    rowcol    r + c + 3 + (nnz + pad_g) * (b + g)
                                              (a weight of r rows of c positions, 2-d or more: a bit
                                               per row and per column saying which hold a nonzero,
                                               then the relative layout over those rows and columns
                                               only, with g-bit gaps, g in 1..8 the cheapest for
                                               the tensor, in a 3-bit field: an input no kept row
                                               reads, such as an image's always-zero border pixel,
                                               costs one bit, not gaps)

Every scale and stored zero point costs 32 bits (a symmetric quantizer's Z = 0 is implicit), those of
the graph-level activation quantizers (adds, concatenations, matmuls, pooling) included, and a
codebook entry 32 bits or 16 with ``quant.table_bits=16``; every tensor left in float (biases,
BatchNorm, LayerNorm, position embeddings, unpruned float weights) costs 32 bits per element, but a
bias stored by a bias quantizer (``quant.bias_bits`` 16: 16 bits per element; 8: 8 bits per element
plus a 32-bit scale). A raw weight matrix quantized by ``quantize_`` (attention
``in_proj_weight``) is counted like a layer's weight, at its bit width. A tensor shared by several
layers (tied weights) is stored and counted once. Nothing here changes the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qpexp.core.modules import CONV_LINEAR
from qpexp.core.prune.masks import get_mask, is_raw_weight
from qpexp.core.prune.nm import (  # noqa: F401 (index_bits: the integer file's N:M layout reads it here)
    check_nm,
    group_columns,
    index_bits,
    nm_bits,
    rank_combination,
    unrank_combination,
)
from qpexp.core.quant.layers import is_quant_layer

FLOAT_BITS = 32
INDEX_BITS = 4
FLAG_BITS = 2
# the format flag is a prefix code: dense 00, bitmask 01, relative 10, nm 110, rowcol 111
LAYOUT_FLAG_BITS = {"dense": 2, "bitmask": 2, "relative": 2, "nm": 3, "rowcol": 3}


def flag_bits(layout: str) -> int:
    """Bits of the format flag naming ``layout`` (:data:`LAYOUT_FLAG_BITS`)."""
    return LAYOUT_FLAG_BITS[layout]


@dataclass
class LayerView:
    name: str
    layer: nn.Module
    wq: nn.Module | None
    aq: nn.Module | None
    owner: nn.Module  # the module whose forward computes this layer (a quantization wrapper or the layer)
    param: str = "weight"  # the weight's parameter name on ``layer`` (``in_proj_weight`` for attention)
    bq: nn.Module | None = None  # the bias quantizer (quant.bias_bits < 32), else the bias is fp32

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.layer, self.param)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias added to this weight's product (``in_proj_bias`` for ``in_proj_weight``); None for a
        raw parameter whose name does not say ``weight`` (``W`` in ``x @ W``): no bias is known by name."""
        if "weight" not in self.param:
            return None
        return getattr(self.layer, self.param.replace("weight", "bias"), None)

    @property
    def bits_w(self) -> int:
        return self.wq.bits if self.wq is not None else FLOAT_BITS

    @property
    def bits_a(self) -> int:
        return self.aq.bits if self.aq is not None else FLOAT_BITS

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the model computes with: masked, and fake-quantized if quantized.

        Computed on a copy of the quantizer, in eval mode: no state changes (a learned step size
        that was never initialized stays so; the copy initializes itself as the first forward would).
        """
        w = self.weight.detach()
        if self.wq is None:
            return w
        wq = copy.deepcopy(self.wq).eval()
        return wq(w).detach()


def layer_views(model: nn.Module) -> list[LayerView]:
    """Every conv/linear layer with its weight and input quantizers (None when in float), then every
    raw weight matrix (attention ``in_proj_weight``, ...; see :func:`prunable_weights`)."""
    views, wrapped = [], set()
    for name, m in model.named_modules():
        if is_quant_layer(m) and isinstance(m.layer, CONV_LINEAR):
            views.append(LayerView(name, m.layer, m.wq, m.aq, m, bq=m._modules.get("bq")))
            wrapped.add(id(m.layer))
        elif isinstance(m, CONV_LINEAR):
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


def unique_views(model: nn.Module) -> list[LayerView]:
    """:func:`layer_views` with each weight tensor once (a weight shared by several layers counts once)."""
    seen, out = set(), []
    for v in layer_views(model):
        if id(v.weight) not in seen:
            seen.add(id(v.weight))
            out.append(v)
    return out


# -- the storage layouts: the one definition, used here to count and by the integer export to write ---
def relative_entries(keep: np.ndarray, gap_bits: int = INDEX_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression relative indexing of the kept positions of a flat mask, ``gap_bits`` a gap
    (``span = 2^gap_bits``; qpexp's files use :data:`INDEX_BITS`).

    Returns (gap index per entry in ``[0, span)``, flat position per entry). An entry ``d`` says
    "skip ``d`` positions, then one stored value"; a run of ``d >= span`` positions without a kept
    one takes ``d // span`` filler entries (each ``d = span - 1`` with the zero code as its value).
    """
    pos = np.flatnonzero(keep)
    if pos.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = 2**gap_bits
    d = np.diff(pos, prepend=-1) - 1
    fillers = d // span
    reps = fillers + 1
    entry_d = np.full(int(reps.sum()), span - 1, np.int64)
    last = np.cumsum(reps) - 1  # the real entry closes each group
    entry_d[last] = d - fillers * span
    entry_pos = np.cumsum(entry_d + 1) - 1
    return entry_d, entry_pos


def live_block(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the flat block of a ``(rows, cols)`` mask over its rows and columns holding a kept position,
    those rows, those columns): what the rowcol layout indexes."""
    rows, cols = keep.any(1), keep.any(0)
    return keep[rows][:, cols].reshape(-1), rows, cols


def rowcol_entries(keep: np.ndarray, gap_bits: int = INDEX_BITS):
    """The ``rowcol`` layout of a ``(rows, cols)`` mask (a weight's rows by everything else): the
    rows and the columns that hold a kept position (bool vectors), and :func:`relative_entries` of
    the mask restricted to them, its positions mapped back to the full flat tensor.

    Returns (gap index per entry, flat position per entry in the full tensor, rows, cols)."""
    keep = np.asarray(keep, dtype=bool)
    block, rows, cols = live_block(keep)
    d, sub = relative_entries(block, gap_bits)
    width = int(cols.sum())
    r, c = (sub // width, sub % width) if width else (sub, sub)
    return d, np.flatnonzero(rows)[r] * keep.shape[1] + np.flatnonzero(cols)[c], rows, cols


def relative_index_padding(w: torch.Tensor) -> int:
    """Filler entries :func:`relative_entries` needs for the nonzeros of ``w``."""
    keep = (w.detach().reshape(-1) != 0).cpu().numpy()
    return int(relative_entries(keep)[0].size - keep.sum())


def nm_entries(keep: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The N:M layout (:mod:`qpexp.core.prune.nm`) of a ``(rows, width)`` mask with at most ``n``
    kept positions in every group of ``m`` columns (the caller checks that).

    Every group stores ``k = min(n, group width)`` positions (:func:`~qpexp.core.prune.nm.group_columns`:
    its kept ones, then the lowest free ones). Returns (the stored flat positions, ascending: row by
    row, group by group; the rank of each full group's set, ``rows * (width // m)`` of them, row
    major; the rank of each row's short last group, or None when ``m`` divides the width)."""
    check_nm(n, m, "nm")
    keep = torch.from_numpy(np.ascontiguousarray(keep, dtype=bool))
    rows, width = keep.shape
    full, r = divmod(width, m)
    cols = group_columns(keep[:, : full * m].reshape(rows, full, m), n)
    ranks = rank_combination(cols, m).reshape(-1).numpy()
    parts = [(cols + m * torch.arange(full).unsqueeze(1)).reshape(rows, -1)]
    tail = None
    if r:
        tail_cols = group_columns(keep[:, full * m :], min(n, r))
        tail = rank_combination(tail_cols, r).numpy()
        parts.append(tail_cols + full * m)
    pos = torch.cat(parts, 1) + width * torch.arange(rows).unsqueeze(1)
    return pos.reshape(-1).numpy(), ranks, tail


def nm_positions(
    ranks: np.ndarray | None, tail: np.ndarray | None, rows: int, width: int, n: int, m: int
) -> np.ndarray:
    """Inverse of :func:`nm_entries`: the stored flat positions from the groups' ranks
    (``ValueError`` for a count that does not fit the shape or a rank outside ``[0, C(m, n))``)."""
    check_nm(n, m, "nm")
    full, r = divmod(width, m)
    ranks, tail = (None if t is None else np.asarray(t).reshape(-1) for t in (ranks, tail))
    if any(t is not None and t.dtype.kind not in "iu" for t in (ranks, tail)):
        raise ValueError("the N:M ranks are not integers")
    if ranks is None or ranks.size != rows * full or (tail is None) != (r == 0) or (r and tail.size != rows):
        raise ValueError(f"the N:M ranks do not fit {rows} rows of {width} in groups of {m}")
    cols = unrank_combination(torch.from_numpy(ranks.astype(np.int64)).reshape(rows, full), m, n)
    parts = [(cols + m * torch.arange(full).unsqueeze(1)).reshape(rows, -1)]
    if r:
        parts.append(unrank_combination(torch.from_numpy(tail.astype(np.int64)), r, min(n, r)) + full * m)
    pos = torch.cat(parts, 1) + width * torch.arange(rows).unsqueeze(1)
    return pos.reshape(-1).numpy()


def layout_bits(n: int, nnz: int, n_entries: int, bits: int, rowcol: int | None = None) -> dict:
    """Payload bits of each layout (format flag excluded) for ``n`` positions, ``nnz`` stored values
    at ``bits`` bits and ``n_entries`` relative-index entries (stored values plus fillers);
    ``rowcol``: the rowcol layout's bits (:func:`rowcol_bits`) where the tensor may take it."""
    out = {"dense": n * bits, "bitmask": nnz * bits + n, "relative": n_entries * (bits + INDEX_BITS)}
    if rowcol is not None:
        out["rowcol"] = rowcol
    return out


ROWCOL_GAP_BITS = range(1, 9)  # the gap widths the rowcol layout may take
GAP_FIELD_BITS = 3  # the rowcol layout's gap width, stored as g - 1


def rowcol_bits(keep: np.ndarray, bits: int, fillers: bool = True) -> tuple[int, int] | None:
    """``(payload bits, gap width)`` of the cheapest rowcol layout of a ``(rows, cols)`` mask with
    values at ``bits``: the row and column bits, the gap-width field and its entries x (bits + g).
    ``fillers=False`` (a pruned weight whose codes leave no pattern free to mark a filler entry,
    :func:`filler_free`): only the gap widths that need no filler; None when none does."""
    keep = np.asarray(keep, dtype=bool)
    block = live_block(keep)[0]
    fixed = keep.shape[0] + keep.shape[1] + GAP_FIELD_BITS
    cost = {}
    for g in ROWCOL_GAP_BITS:
        n_entries = relative_entries(block, g)[0].size
        if fillers or n_entries == int(block.sum()):
            cost[g] = fixed + n_entries * (bits + g)
    if not cost:
        return None
    g = min(cost, key=cost.get)
    return cost[g], g


def filler_free(wq: nn.Module | None) -> bool:
    """Whether a pruned weight's stored codes leave a pattern free to mark a filler entry (the integer
    file keeps the pruning mask, so a filler must differ from a kept weight that quantized to 0):
    float weights (NaN), symmetric narrow-range linear and log codes do; asymmetric or full-range
    linear codes (every one of the ``2^b`` patterns taken) do not."""
    if wq is None or not hasattr(wq, "qmin"):
        return True
    return code_left_free(bool(getattr(wq, "symmetric", True)), wq.qmin, wq.qmax, wq.bits)


def code_left_free(symmetric: bool, qmin: int, qmax: int, bits: int) -> bool:
    """Whether integer codes in ``[qmin, qmax]`` at ``bits`` bits leave one of the ``2^bits`` patterns
    unused (symmetric narrow range), so that it can mark a filler entry; asymmetric codes never do."""
    return symmetric and qmax - qmin + 1 < 2**bits


def tensor_bits(w: torch.Tensor, bits: int, nm: tuple[int, int] | None = None, fillers: bool = True) -> dict:
    """Storage of one compressed weight tensor: the cheapest format, plus the format flag.

    ``nm=(n, m)`` adds the N:M layout (:func:`qpexp.core.prune.nm.nm_bits`: ``n`` values at ``bits``
    plus ``ceil(log2 C(m, n))`` index bits per group of ``m``) where every group holds at most ``n``
    nonzeros. ``fillers``: whether the rowcol layout may use filler entries (:func:`rowcol_bits`)."""
    n = w.numel()
    nnz = int(torch.count_nonzero(w))
    rowcol = None
    if w.dim() >= 2:
        rowcol = rowcol_bits((w.detach().reshape(w.shape[0], -1) != 0).cpu().numpy(), bits, fillers)
    options = layout_bits(n, nnz, nnz + relative_index_padding(w), bits, rowcol and rowcol[0])
    if nm is not None and w.dim() >= 2:
        b = nm_bits(w, nm[0], nm[1], bits)
        if b is not None:
            options["nm"] = b
    fmt = min(options, key=lambda k: options[k] + flag_bits(k))
    return {"bits": options[fmt] + flag_bits(fmt), "format": fmt, "n": n, "nnz": nnz}


def _quantizer_bits(q: nn.Module | None) -> int:
    """A quantizer's parameters (scales, zero points, codebook entries), each at its ``qparam_bits``
    (fp32 unless the quantizer says otherwise: a float16 codebook)."""
    if q is None:
        return 0
    scales, zeros = q.n_qparams()
    return (scales + zeros) * getattr(q, "qparam_bits", FLOAT_BITS)


def bias_bits(v: LayerView) -> int:
    """Bits of ``v``'s bias: fp32, or as its bias quantizer stores it (:mod:`qpexp.core.quant.bias`)."""
    n = v.bias.numel()
    return v.bq.storage_bits(n) if v.bq is not None else n * FLOAT_BITS


def size_bits(model: nn.Module, detail: bool = False, nm: tuple[int, int] | None = None):
    """Total storage in bits of everything needed to run ``model`` (see the module docstring).

    ``nm=(n, m)``: pruned weights may also take the N:M layout (:func:`tensor_bits`); the record
    keeps that count apart (``final/size_bits_nm``), and the integer file writes the layout when
    converted with the same ``nm`` (the pipeline does so for ``prune.structure=nm``)."""
    total, rows, counted, counted_q = 0, {}, set(), set()
    for v in layer_views(model):
        compressed = v.wq is not None or get_mask(v.layer, v.param) is not None
        if id(v.weight) in counted:  # a tied weight: stored once, with the first layer using it
            t = {"bits": 0, "format": "shared", "n": 0, "nnz": 0}
        elif compressed:
            fillers = get_mask(v.layer, v.param) is None or filler_free(v.wq)  # as the integer file
            t = tensor_bits(v.effective_weight(), v.bits_w, nm, fillers)
        else:
            w = v.weight.detach()
            t = {
                "bits": w.numel() * FLOAT_BITS,
                "format": "float",
                "n": w.numel(),
                "nnz": int(w.count_nonzero()),
            }
        qbits = sum(_quantizer_bits(q) for q in (v.wq, v.aq) if id(q) not in counted_q)
        counted_q.update({id(v.wq), id(v.aq)})
        has_bias = v.bias is not None and id(v.bias) not in counted
        bias = bias_bits(v) if has_bias else 0
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


def deployable_size_bits(model: nn.Module, example=None, detail: bool = False):
    """:func:`size_bits` of the model as deployed: BatchNorms that feed from a conv (or a linear)
    folded into it (a bias per channel instead of four BatchNorm tensors), as quantization folds
    them; so a float model and its quantized version count BatchNorm the same way."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return size_bits(model, detail=detail)
    from qpexp.core.quant.graph import folded_copy

    return size_bits(folded_copy(model, example), detail=detail)


def _unique_modules(model: nn.Module):
    return list({id(m): m for m in model.modules()}.values())


def _is_model_state_buffer(name: str) -> bool:
    """Buffers the model needs at inference (BatchNorm statistics), not masks or observer state."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("running_mean", "running_var")


DENSE_PARAMS_ATTR = "qpexp_dense_prunable_params"  # set on a model by physical channel pruning


def prunable_params(model: nn.Module) -> int:
    """Number of prunable weights (conv/linear weights; a tied weight once) the model stores now."""
    return sum(v.weight.numel() for v in unique_views(model))


@torch.no_grad()
def pruned_fraction(model: nn.Module, dense_params: int | None = None) -> float:
    """Fraction of the dense model's prunable weights (conv/linear) that are pruned: exactly zero in
    the model's own (latent, unquantized) weights, or removed with their channels.

    ``dense_params``: the prunable weight count of the dense model (:func:`prunable_params` of it).
    Default: the count :func:`qpexp.core.prune.channel.physically_prune` remembered on the model,
    else the model's own count (which cannot see channels removed by other means). This is the
    record's ``final/sparsity``.
    """
    kept = sum(int(v.weight.count_nonzero()) for v in unique_views(model))
    dense = dense_params or getattr(model, DENSE_PARAMS_ATTR, None) or prunable_params(model)
    return 1 - kept / max(dense, 1)


sparsity = pruned_fraction  # the name the README and notebooks use


@torch.no_grad()
def zero_fraction(model: nn.Module) -> float:
    """Fraction of the stored prunable weights (conv/linear) that are exactly zero as the model
    computes with them: masked *and quantized* (a kept weight that quantizes to 0 counts). These
    are the zeros the size accounting stores for free. The record's ``final/zero_fraction``."""
    zeros = total = 0
    for v in unique_views(model):
        w = v.effective_weight()
        zeros += w.numel() - int(w.count_nonzero())
        total += w.numel()
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


@torch.no_grad()
def model_macs(model: nn.Module, example: torch.Tensor) -> dict:
    """MACs per sample of every conv/linear layer, total MACs and BOPs, counted by torch's
    :class:`~torch.utils.flop_counter.FlopCounterMode` on one forward of ``example[:1]``
    (MACs = FLOPs / 2; any input rank, grouped convs, a layer called twice counted twice).

    ``macs`` also counts matrix products outside conv/linear layers (e.g. attention), in float.
    BOPs = sum over layers of MACs x weight bits x input activation bits (32 when in float).
    Unstructured zeros do not reduce MACs (no sparse kernel is assumed); physically removed
    channels do. The forward runs on a copy of the model in eval mode: nothing in ``model`` changes.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).eval()
    views: dict[int, LayerView] = {}
    for v in layer_views(model):  # one view per module that computes: its ``weight`` if it has one
        if v.param == "weight" or id(v.owner) not in views:
            views[id(v.owner)] = v
    per_layer: dict[str, int] = dict.fromkeys((v.name for v in views.values()), 0)
    counter = FlopCounterMode(display=False)
    started: list[int] = []

    def pre_hook(mod, inp):
        started.append(counter.get_total_flops())

    def hook(mod, inp, out):
        per_layer[views[id(mod)].name] += (counter.get_total_flops() - started.pop()) // 2

    hooks = []
    for v in views.values():
        hooks.append(v.owner.register_forward_pre_hook(pre_hook))
        hooks.append(v.owner.register_forward_hook(hook))
    # the math attention kernel, with autograd on (else nn.MultiheadAttention takes its fused fast path):
    # FlopCounterMode does not see inside fused attention kernels
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    total = counter.get_total_flops() // 2
    bops = sum(per_layer[v.name] * v.bits_w * v.bits_a for v in views.values())
    bops += (total - sum(per_layer.values())) * FLOAT_BITS * FLOAT_BITS
    return {"macs": total, "bops": bops, "layers": per_layer}
