"""The integer file's shared pieces: what the per-op format (:mod:`.export`) and the graph format
(:mod:`.graph_export`) both store and read, in one place.

* ``EXACT_INT``: float64 holds every integer below it exactly (the integer accumulations check it);
* :func:`container`: the one table of ONNX QDQ element types a ``bits``-bit code travels in;
* a weight's and an activation quantizer's IR (codes, qparams, mask) and their encoding into the
  byte blob (bit packing, the dense/bitmask/relative/nm layouts, segments);
* the package on disk (:func:`save_package`, :func:`read_package`: a zlib-compressed JSON header and
  one byte blob, ``.npz`` or ``.pt``, no pickle) and :func:`package_stats` (where its bytes go),
  the same for either format.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qpexp.core.accounting import (
    INDEX_BITS,
    check_nm,
    code_left_free,
    flag_bits,
    index_bits,
    layout_bits,
    nm_bits,
    nm_entries,
    nm_positions,
    relative_entries,
    rowcol_bits,
    rowcol_entries,
)
from qpexp.core.quant.groups import n_groups
from qpexp.core.quant.linear import LinearQuantizer
from qpexp.core.quant.log import CompandingQuantizer, Pow2Quantizer
from qpexp.core.quant.spec import QuantSpec

PACKAGE_FORMAT = "qpexp.intmodel/1"  # the .pt wrapper's tag, whatever the header's format


LOG_SCHEMES = {"log": Pow2Quantizer, "companding": CompandingQuantizer}


EXACT_INT = 2**53  # float64 holds every integer below this exactly (the one definition)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


def _weight_ir(layer: nn.Module, wq: nn.Module | None) -> dict:
    """A layer's weight: integer codes and qparams (quantized) or float values, and its mask."""
    w = layer.weight.detach()
    mask = getattr(layer, "weight_mask", None)
    mask = None if mask is None or bool((mask != 0).all()) else _np(mask != 0)
    if wq is None:
        return {"scheme": "float", "shape": list(w.shape), "values": _np(w.float()), "mask": mask}
    per_channel = bool(getattr(wq, "per_channel", False))
    ir = {
        "bits": int(wq.bits),
        "shape": list(w.shape),
        "per_channel": per_channel,
        "ch_axis": int(wq.ch_axis),
        "mask": mask,
    }
    if getattr(wq, "per_group", False):
        ir["group_size"] = int(wq.group_size)  # scales: C * ceil(K / group_size), row by row
    with torch.no_grad():
        codes = wq.int_repr(w)
        if isinstance(wq, LinearQuantizer):
            scale, zero = wq.qparams(w)
            ir.update(
                scheme="linear",
                symmetric=bool(wq.symmetric),
                qmin=wq.qmin,
                qmax=wq.qmax,
                scale=_np(scale.float()),
            )
            ir["zero_point"] = None if wq.symmetric else _np(zero.to(torch.int32))
        elif isinstance(wq, (Pow2Quantizer, CompandingQuantizer)):
            a = 2 ** (wq.bits - 1) - 1
            scheme = "log" if isinstance(wq, Pow2Quantizer) else "companding"
            ir.update(scheme=scheme, symmetric=True, qmin=-a, qmax=a, max_abs=_np(wq.scale_max(w).float()))
        else:
            raise NotImplementedError(f"convert: weight quantizer {type(wq).__name__} has no integer export")
    ir["codes"] = _np(codes.to(torch.int32))
    return ir


def _act_ir(aq: nn.Module | None) -> dict | None:
    if aq is None:
        return None
    if isinstance(aq, LinearQuantizer):
        if aq.range != "lsq" and not aq.is_initialized():
            raise RuntimeError(
                "convert: an activation quantizer was never calibrated (run a batch in train mode)"
            )
        scale, zero = aq.qparams()
        return {
            "scheme": "linear",
            "bits": int(aq.bits),
            "symmetric": bool(aq.symmetric),
            "qmin": aq.qmin,
            "qmax": aq.qmax,
            "scale": _np(scale.float().reshape(-1)),
            "zero_point": None if aq.symmetric else _np(zero.to(torch.int32).reshape(-1)),
        }
    if isinstance(aq, (Pow2Quantizer, CompandingQuantizer)):
        a = 2 ** (aq.bits - 1) - 1
        scheme = "log" if isinstance(aq, Pow2Quantizer) else "companding"
        return {
            "scheme": scheme,
            "bits": int(aq.bits),
            "symmetric": True,
            "qmin": -a,
            "qmax": a,
            "per_channel": bool(aq.per_channel),
            "max_abs": _np(aq.scale_max().float()),
        }
    raise NotImplementedError(f"convert: activation quantizer {type(aq).__name__} has no integer export")


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers below ``2^bits`` packed into bytes, ``bits`` each, little-endian."""
    u = np.asarray(u, dtype=np.int64).reshape(-1)
    if u.size and (u.min() < 0 or u.max() >= 2**bits):
        raise ValueError(f"pack_bits: values outside [0, 2^{bits})")
    if bits == 8:
        return u.astype(np.uint8)
    word = np.uint32 if bits <= 32 else np.uint64  # wide N:M ranks (C(m, n) >= 2^32)
    planes = ((u.astype(word)[:, None] >> np.arange(bits, dtype=word)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (int64)."""
    buf = np.asarray(buf, dtype=np.uint8)
    if bits == 8:
        return buf[:count].astype(np.int64)
    planes = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(1)


def group_geometry(shape, ch_axis: int) -> tuple[int, int, list[int], list[int] | None]:
    """A per-group weight's geometry (:mod:`~qpexp.core.quant.groups`): ``C``, ``K`` (elements per
    output channel), the shape with the channel axis moved first, and the permutation that moves it
    back (None when it is already first)."""
    ax = ch_axis % len(shape)
    c = shape[ax]
    k = math.prod(shape) // c if c else 0
    moved = [c] + [d for i, d in enumerate(shape) if i != ax]
    perm = None if ax == 0 else [*range(1, ax + 1), 0, *range(ax + 1, len(shape))]
    return c, k, moved, perm


def group_full(values: np.ndarray, shape, ch_axis: int, group_size: int) -> np.ndarray:
    """Per-group values (``C * G``, row by row: :mod:`~qpexp.core.quant.groups`) at every position of
    a weight of ``shape``."""
    c, k, moved, _ = group_geometry(shape, ch_axis)
    g = n_groups(k, group_size)
    full = np.repeat(np.asarray(values).reshape(c, g), group_size, axis=1)[:, :k]
    return np.moveaxis(full.reshape(moved), 0, ch_axis % len(shape))


def group_padded(
    codes: np.ndarray, zero: np.ndarray | None, shape, ch_axis: int, group_size: int
) -> np.ndarray:
    """A weight's codes per group as ``(C * G, group_size)``: its ``(C, K)`` rows (channel axis first)
    padded to whole groups with each group's zero point (a code that means 0.0; 0 if symmetric).
    The ONNX form: DequantizeLinear on this along axis 0, then the padding sliced off."""
    c, k, _, _ = group_geometry(shape, ch_axis)
    rows = np.moveaxis(np.asarray(codes), ch_axis % len(shape), 0).reshape(c, k).astype(np.int64)
    g = n_groups(k, group_size)
    z = np.zeros(c * g, np.int64) if zero is None else np.asarray(zero).astype(np.int64).reshape(-1)
    out = np.repeat(z.reshape(c, g), group_size, axis=1)
    out[:, :k] = rows
    return out.reshape(c * g, group_size)


def qparam_count(w: dict) -> int:
    """How many scales (and stored zero points) a linear weight of this IR holds: 1 per tensor,
    ``shape[ch_axis]`` per channel, ``C * ceil(K / group_size)`` per group."""
    if w.get("group_size") is not None:
        c, k, _, _ = group_geometry(w["shape"], w.get("ch_axis", 0))
        return c * n_groups(k, w["group_size"])
    return w["shape"][w.get("ch_axis", 0)] if w["per_channel"] else 1


def dequantize_linear(w: dict) -> np.ndarray:
    """A linear-quantized weight's values from its IR (:func:`model_ir`): ``(q - Z) * S`` in float32,
    per tensor, per output channel or per group; the fake-quantize kernel's arithmetic, so bit for
    bit the weight the fake-quantized model computes with."""
    zp = w.get("zero_point")
    if w.get("group_size") is not None:
        args = (w["shape"], w.get("ch_axis", 0), w["group_size"])
        scale = group_full(np.asarray(w["scale"], np.float32), *args)
        zero = np.float32(0) if zp is None else group_full(np.asarray(zp).astype(np.float32), *args)
        return ((np.asarray(w["codes"]).astype(np.float32) - zero) * scale).astype(np.float32)
    shape = [1] * len(w["shape"])
    shape[w.get("ch_axis", 0)] = -1
    bshape = shape if w["per_channel"] else []
    scale = np.asarray(w["scale"], np.float32).reshape(bshape)
    zero = np.float32(0) if zp is None else np.asarray(zp).astype(np.float32).reshape(bshape)
    return ((np.asarray(w["codes"]).astype(np.float32) - zero) * scale).astype(np.float32)


def _zero_codes(ir: dict) -> np.ndarray:
    """The code that means 0.0 at every position (``Z`` of the position's channel; 0 if symmetric)."""
    shape = ir["shape"]
    if ir["scheme"] == "float":
        return np.zeros(shape, np.float32)
    zero = ir.get("zero_point")
    if zero is None:
        return np.zeros(shape, np.int64)
    zero = zero.astype(np.int64)
    if ir.get("group_size") is not None:
        return group_full(zero, shape, ir.get("ch_axis", 0), ir["group_size"]).copy()
    if ir["per_channel"]:
        bshape = [1] * len(shape)
        bshape[ir["ch_axis"]] = -1
        return np.broadcast_to(zero.reshape(bshape), shape).copy()
    return np.full(shape, int(zero.reshape(-1)[0]), np.int64)


class _Blob:
    def __init__(self):
        self.parts: list[bytes] = []
        self.offset = 0

    def add(self, arr: np.ndarray, **meta) -> dict:
        data = np.ascontiguousarray(arr).tobytes()
        seg = {"offset": self.offset, "nbytes": len(data), **meta}
        self.parts.append(data)
        self.offset += len(data)
        return seg

    def add_array(self, arr: np.ndarray | None) -> dict | None:
        if arr is None:
            return None
        return self.add(arr, dtype=str(arr.dtype), shape=list(arr.shape))

    def add_codes(self, codes: np.ndarray, bits: int, low: int, int8: bool = False) -> dict:
        """Codes as int8 (``int8``) or bit-packed ``code - low`` in ``bits`` bits."""
        codes = np.asarray(codes, np.int64).reshape(-1)
        if int8:
            return self.add(codes.astype(np.int8), dtype="int8", count=int(codes.size))
        return self.add(
            pack_bits(codes - low, bits), dtype="packed", bits=bits, offset_by=low, count=int(codes.size)
        )


def _filler_code(ir: dict) -> int | float | None:
    """The value a relative-layout filler of a *pruned* layer carries, so that the mask comes back
    exactly: a code outside the quantizer's range (symmetric and log codes leave one of the
    ``2^b`` patterns free), NaN for float weights; None where every pattern is taken (asymmetric,
    or symmetric over the full range: ``quant.narrow_range=false``)."""
    if ir["scheme"] == "float":
        return float("nan")
    if not code_left_free(ir["symmetric"], ir["qmin"], ir["qmax"], ir["bits"]):  # asymmetric, full range
        return None
    return ir["qmin"] - 1 if _int8_codes(ir) else ir["qmax"] + 1


def _int8_codes(ir: dict) -> bool:
    return ir["bits"] == 8 and ir["qmin"] < 0


def _encode_weight(ir: dict, blob: _Blob, nm: tuple[int, int] | None = None) -> dict:
    """A weight's header entry (its codes or float values, positions and qparams go to ``blob``), in
    the cheapest layout of :func:`_choose_layout`; ``nm=(n, m)`` lets it take the N:M layout."""
    scheme = ir["scheme"]
    bits = 32 if scheme == "float" else ir["bits"]
    flat = ir["values" if scheme == "float" else "codes"].reshape(-1)
    zero = _zero_codes(ir).reshape(-1)
    pruned = ir["mask"] is not None
    # the layout is the pruning mask; unpruned: the nonzero codes, where that is cheaper
    keep = ir["mask"].reshape(-1) if pruned else flat != zero
    layout, costs, entries = _choose_layout(ir, keep, bits, nm)
    out = {
        k: v for k, v in ir.items() if k not in ("codes", "values", "mask", "scale", "zero_point", "max_abs")
    }
    out.update(layout=layout, pruned=pruned, payload_bits=costs[layout] + flag_bits(layout))
    out["positions"] = None
    if layout == "dense":
        stored = flat
    elif layout == "bitmask":
        stored = flat[keep]
        bitmask = np.packbits(keep.astype(np.uint8), bitorder="little")
        out["positions"] = blob.add(bitmask, dtype="bitmask", count=int(keep.size))
    elif layout in ("relative", "rowcol"):
        entry_d, entry_pos = entries[:2]
        stored = flat[entry_pos]
        out["positions"] = _add_packed(blob, entry_d, entries[4] if layout == "rowcol" else INDEX_BITS)
        if layout == "rowcol":  # which rows and columns the relative layout runs over
            for key, live in zip(("rows", "cols"), entries[2:4]):
                out[key] = blob.add(np.packbits(live.astype(np.uint8), bitorder="little"),
                                    dtype="bitmask", count=int(live.size))  # fmt: skip
    else:
        entry_pos, ranks, tail = entries
        stored = flat[entry_pos]
        n, m = nm
        r = (flat.size // ir["shape"][0]) % m
        out["nm"] = [n, m]
        out["positions"] = _add_packed(blob, ranks, index_bits(n, m))
        out["tail_positions"] = None if tail is None else _add_packed(blob, tail, index_bits(min(n, r), r))
    if pruned and layout in ("relative", "rowcol", "nm"):  # a stored position outside the mask: the filler
        stored = stored.astype(np.float32 if scheme == "float" else np.int64)
        outside = ~keep[entry_pos]
        if outside.any():  # (an asymmetric weight has no filler code: its N:M groups are full)
            stored[outside] = _filler_code(ir)
    if scheme == "float":
        out["values"] = blob.add_array(np.asarray(stored, np.float32))
    else:
        out["values"] = blob.add_codes(stored, bits, ir["qmin"], int8=_int8_codes(ir))
    for k in ("scale", "zero_point", "max_abs"):
        if k in ir:
            out[k] = blob.add_array(ir[k])
    return out


def _add_packed(blob: _Blob, u: np.ndarray, bits: int) -> dict:
    """Non-negative integers bit-packed at ``bits`` each (:func:`pack_bits`)."""
    return blob.add(pack_bits(u, bits), dtype="packed", bits=bits, offset_by=0, count=int(u.size))


def _choose_layout(ir: dict, keep: np.ndarray, bits: int, nm: tuple[int, int] | None):
    """(layout, payload bits of each layout, its entries) for the flat positions ``keep``.

    The candidates: a pruned weight a sparse layout over its mask (relative only where a filler
    code can mark the entries outside it); an unpruned one dense, or its nonzero codes in a sparse
    layout (a float weight stays dense, as counted); with ``nm=(n, m)`` also the N:M layout where
    every group of ``keep`` holds at most ``n`` positions (:func:`_nm_candidate`). The cheapest
    wins, ties to the earlier, as :func:`~qpexp.core.accounting.tensor_bits` chooses; a weight of two
    or more dimensions may take the rowcol layout where it may take the relative one. The entries:
    :func:`relative_entries` (relative), :func:`rowcol_entries` (rowcol), :func:`nm_entries` (nm),
    else None."""
    if ir["mask"] is not None:
        candidates = ("bitmask", "relative") if _filler_code(ir) is not None else ("bitmask",)
    else:
        candidates = ("dense",) if ir["scheme"] == "float" else ("dense", "bitmask", "relative")
    entries = {"relative": relative_entries(keep)}
    rowcol = None
    if candidates != ("dense",) and len(ir["shape"]) >= 2 and ir["shape"][0]:
        fillers = ir["mask"] is None or _filler_code(ir) is not None  # as accounting.size_bits asks
        rowcol = rowcol_bits(keep.reshape(ir["shape"][0], -1), bits, fillers)
    if rowcol is not None:
        entries["rowcol"] = (*rowcol_entries(keep.reshape(ir["shape"][0], -1), rowcol[1]), rowcol[1])
        candidates += ("rowcol",)
        rowcol = rowcol[0]
    costs = layout_bits(keep.size, int(keep.sum()), entries["relative"][0].size, bits, rowcol)
    nm_layout = _nm_candidate(ir, keep, bits, nm) if candidates != ("dense",) else None
    if nm_layout is not None:
        costs["nm"], entries["nm"] = nm_layout
        candidates += ("nm",)
    layout = min(candidates, key=lambda k: costs[k] + flag_bits(k))
    return layout, costs, entries.get(layout)


def _nm_candidate(ir: dict, keep: np.ndarray, bits: int, nm: tuple[int, int] | None):
    """(payload bits, :func:`nm_entries`) of the N:M layout of ``keep``, or None where it cannot
    store the weight: no ``nm``, a 1-d tensor, a group holding more than ``n``, or a pruned group
    holding fewer than it stores with no free code to mark the extra positions (:func:`_filler_free`)."""
    if nm is None or len(ir["shape"]) < 2 or not ir["shape"][0]:
        return None
    n, m = nm
    check_nm(n, m, "nm")
    mask = keep.reshape(ir["shape"][0], -1)
    cost = nm_bits(torch.from_numpy(mask), n, m, bits)
    if cost is None:
        return None
    entries = nm_entries(mask, n, m)
    if ir["mask"] is not None and not keep[entries[0]].all() and not _filler_free(ir):
        return None
    return cost, entries


def _filler_free(ir: dict) -> bool:
    """Whether the filler code (:func:`_filler_code`) is a pattern the stored codes leave free: not
    for asymmetric codes, nor for full-range symmetric ones (``[-2^(b-1), 2^(b-1) - 1]``)."""
    filler = _filler_code(ir)
    if filler is None or ir["scheme"] == "float":
        return filler is not None
    if _int8_codes(ir):
        return filler >= -128
    return filler - ir["qmin"] < 2 ** ir["bits"]


SEGMENT_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)


def _decode_segment(blob: np.ndarray, seg: dict | None) -> np.ndarray | None:
    if seg is None:
        return None
    raw = blob[seg["offset"] : seg["offset"] + seg["nbytes"]]
    if seg["dtype"] == "packed":
        return unpack_bits(raw, seg["bits"], seg["count"]) + seg["offset_by"]
    if seg["dtype"] == "bitmask":
        return np.unpackbits(raw, count=seg["count"], bitorder="little").astype(bool)
    if seg["dtype"] == "int8":
        return raw.view(np.int8)[: seg["count"]].astype(np.int64)
    if seg["dtype"] not in SEGMENT_DTYPES:  # numeric arrays only: never object or structured dtypes
        raise ValueError(f"the file stores an array of dtype {seg['dtype']!r}, which is not allowed")
    return raw.view(np.dtype(seg["dtype"])).reshape(seg["shape"]).copy()


LAYOUTS = ("dense", "bitmask", "relative", "rowcol", "nm")  # the weight layouts a file may name


def _decode_weight(w: dict, blob: np.ndarray, name: str = "") -> dict:
    """Inverse of :func:`_encode_weight`: the weight's IR (full codes or values, qparams, mask).
    ``name``: the layer, for the errors (a layout outside :data:`LAYOUTS`, bad N:M ranks)."""
    if w.get("layout") not in LAYOUTS:
        raise ValueError(f"layer {name!r}: weight layout {w.get('layout')!r} is not one of {LAYOUTS}")
    skip = ("values", "positions", "rows", "cols", "scale", "zero_point", "max_abs")
    ir = {k: v for k, v in w.items() if k not in skip}
    for k in ("scale", "zero_point", "max_abs"):
        if k in w:
            ir[k] = _decode_segment(blob, w[k])
    if w.get("scheme") == "linear":
        _check_qparams(ir, name)
    values = _decode_segment(blob, w["values"])
    flat = _zero_codes(ir).reshape(-1)
    keep = None
    if w["layout"] == "dense":
        flat = values.astype(flat.dtype)
    elif w["layout"] == "bitmask":
        keep = _decode_segment(blob, w["positions"])
        flat[keep] = values
    else:
        if w["layout"] == "nm":
            pos = _nm_decode_positions(w, blob, name)
            if values.size != pos.size:
                raise ValueError(f"layer {name!r}: {values.size} stored values for {pos.size} N:M positions")
        elif w["layout"] == "rowcol":
            pos = _rowcol_decode_positions(w, blob, name)
        else:
            pos = np.cumsum(_decode_segment(blob, w["positions"]) + 1) - 1
        if pos.size and (pos.max() >= flat.size or values.size != pos.size):
            raise ValueError(f"layer {name!r}: the {w['layout']} positions do not fit a {w['shape']} weight")
        real = np.ones(pos.size, bool)
        if w["pruned"]:
            marker = _filler_code(ir)
            if marker is not None:  # (None: an asymmetric weight, whose N:M groups are full)
                real = ~np.isnan(values) if w["scheme"] == "float" else values != marker
        flat[pos[real]] = values[real]
        keep = np.zeros(flat.size, bool)
        keep[pos[real]] = True
    ir["values" if w["scheme"] == "float" else "codes"] = flat.reshape(w["shape"])
    ir["mask"] = keep.reshape(w["shape"]) if w["pruned"] else None
    return ir


def _check_qparams(ir: dict, name: str) -> None:
    """A linear weight's ``shape``, ``ch_axis``, ``per_channel``/``group_size`` and the sizes of its
    scale and zero-point arrays agree, or ``ValueError`` naming the layer (before anything is built)."""
    shape, axis, gs = ir.get("shape"), ir.get("ch_axis", 0), ir.get("group_size")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"layer {name!r}: weight shape {shape!r} is not a list of sizes")
    if type(axis) is not int or not 0 <= axis < len(shape):
        raise ValueError(f"layer {name!r}: weight ch_axis={axis!r} is not an axis of shape {shape}")
    if gs is not None and (type(gs) is not int or gs < 1 or ir.get("per_channel")):
        raise ValueError(
            f"layer {name!r}: weight group_size={gs!r} must be an integer >= 1 (not per channel)"
        )
    n = qparam_count(ir)
    what = (
        f"group_size={gs}" if gs is not None else ("per channel" if ir.get("per_channel") else "per tensor")
    )
    for k in ("scale", "zero_point"):
        arr = ir.get(k)
        if k == "scale" and arr is None:
            raise ValueError(f"layer {name!r}: a linear weight without its scale")
        if arr is not None and (arr.size != n or arr.ndim > 1):
            raise ValueError(
                f"layer {name!r}: weight {k} has shape {list(arr.shape)}, but a {shape} weight {what} "
                f"needs {n} values"
            )


def _rowcol_decode_positions(w: dict, blob: np.ndarray, name: str) -> np.ndarray:
    """The flat positions of a rowcol entry (:func:`rowcol_entries`), or ``ValueError`` naming the
    layer when its row or column bits do not fit the shape or a gap runs past the live block."""
    shape = w["shape"]
    rows, cols = _decode_segment(blob, w.get("rows")), _decode_segment(blob, w.get("cols"))
    n_cols = math.prod(shape[1:]) if len(shape) >= 2 else -1
    if rows is None or cols is None or rows.size != shape[0] or cols.size != n_cols:
        raise ValueError(f"layer {name!r}: the rowcol row/column bits do not fit a {shape} weight")
    sub = np.cumsum(_decode_segment(blob, w["positions"]) + 1) - 1
    width = int(cols.sum())
    if sub.size and sub.max() >= int(rows.sum()) * width:
        raise ValueError(
            f"layer {name!r}: the rowcol gaps run past its {int(rows.sum())} x {width} live block"
        )
    r, c = (sub // width, sub % width) if width else (sub, sub)
    return np.flatnonzero(rows)[r] * n_cols + np.flatnonzero(cols)[c]


def _nm_decode_positions(w: dict, blob: np.ndarray, name: str) -> np.ndarray:
    """The flat positions an N:M entry stores (:func:`nm_positions`), or ``ValueError`` naming the
    layer: ``nm`` not a valid ``[n, m]``, ranks that do not fit the shape or outside ``[0, C(m, n))``."""
    try:
        n, m = w["nm"]
        check_nm(n, m, "nm")
        rows = w["shape"][0]
        ranks = _decode_segment(blob, w["positions"])
        tail = _decode_segment(blob, w.get("tail_positions"))
        return nm_positions(ranks, tail, rows, math.prod(w["shape"]) // rows, n, m)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"layer {name!r}: N:M layout nm={w.get('nm')!r}: {e}") from None


def _log_quantizer(spec: dict, is_weight: bool, channels: int) -> nn.Module:
    cls = LOG_SCHEMES[spec["scheme"]]
    gran = "channel" if spec.get("per_channel") else "tensor"
    return cls(
        QuantSpec(bits=spec["bits"], scheme=spec["scheme"], granularity=gran),
        is_weight=is_weight,
        channels=channels,
        ch_axis=spec.get("ch_axis", 0),
    )


def save_package(header: str, blob: np.ndarray, path: str | Path) -> Path:
    """Write ``.pt`` (``torch.load(weights_only=True)``) or ``.npz`` (no pickle) by suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = np.frombuffer(zlib.compress(header.encode(), 9), np.uint8)
    if path.suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, header=head, blob=blob)
    elif path.suffix in (".pt", ".pth"):
        torch.save(
            {
                "format": PACKAGE_FORMAT,
                "header": torch.from_numpy(head.copy()),
                "blob": torch.from_numpy(blob),
            },
            path,
        )
    else:
        raise ValueError(f"convert: unknown file type {path.suffix!r}: use .pt or .npz")
    return path


def read_package(path: str | Path) -> tuple[str, np.ndarray]:
    """(header, blob) of a file written by :func:`convert` (no pickle is executed)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            head, blob = z["header"], z["blob"].copy()
    else:
        pkg = torch.load(path, weights_only=True)
        if not isinstance(pkg, dict) or pkg.get("format") != PACKAGE_FORMAT:
            raise ValueError(f"{path}: not a {PACKAGE_FORMAT} file")
        head, blob = pkg["header"].numpy(), pkg["blob"].numpy().copy()
    return zlib.decompress(head.tobytes()).decode(), blob


def package_stats(path: str | Path) -> dict:
    """Where the bytes of a converted file (either format) go: payload (the blob), JSON header,
    container, and the payload the accounting formulas predict (codes in their layout, format
    flags, qparams, floats)."""
    path = Path(path)
    header, blob = read_package(path)
    meta = json.loads(header)
    predicted = 0
    for entry in meta.get("ops", meta.get("nodes", [])):  # per-op list or graph nodes
        for k, v in entry.items():
            if k == "weight":
                predicted += _weight_payload_bits(v)
            elif k == "act" and v:
                predicted += sum(8 * s["nbytes"] for s in v.values() if isinstance(s, dict))
            elif isinstance(v, dict) and "offset" in v:  # a float tensor: bias, BatchNorm, const
                predicted += 8 * v["nbytes"]
    head = len(zlib.compress(header.encode(), 9))
    size = path.stat().st_size
    return {
        "file_bytes": size,
        "payload_bytes": int(blob.size),
        "header_bytes": head,
        "container_bytes": size - int(blob.size) - head,
        "accounted_payload_bits": int(predicted),
    }


def _weight_payload_bits(w: dict) -> int:
    bits = w["payload_bits"] if w["scheme"] != "float" or w["pruned"] else math.prod(w["shape"]) * 32
    return bits + sum(8 * w[k]["nbytes"] for k in ("scale", "zero_point", "max_abs") if w.get(k))


def container(bits: int, signed: bool) -> tuple[str, int, int]:
    """(ONNX element type name, its width, code shift) of the QDQ type that holds ``bits``-bit codes:
    the one table both formats' ONNX models and the graph file's QDQ nodes use.

    8-bit codes always travel as uint8: signed codes are shifted by +128 together with their zero
    point, which dequantizes to exactly the same values. onnxruntime fuses DQ -> Conv -> Q into
    QLinearConv, and its u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512F) add pairs of
    u8 x s8 products in saturating int16 (``vpmaddubsw``): 255 x 127 x 2 overflows, the logits move
    and accuracy drops (10 points on the 8-bit MNIST-1D CNN with onnxruntime 1.32). u8u8 kernels
    widen first and are exact on every CPU."""
    if bits <= 4:
        return ("INT4" if signed else "UINT4"), 4, 0
    if bits <= 8:
        return "UINT8", 8, 128 if signed else 0
    return ("INT16" if signed else "UINT16"), 16, 0


# the codes each container holds (before the shift)
CONTAINER_RANGE = {
    "INT4": (-8, 7),
    "UINT4": (0, 15),
    "UINT8": (0, 255),
    "INT16": (-(2**15), 2**15 - 1),
    "UINT16": (0, 2**16 - 1),
}
