"""Entropy-coded size (Deep Compression's last stage, Han et al. 2016): Huffman-coded weight storage.

:func:`size_bits_huffman` is :func:`qpexp.core.accounting.size_bits` with every compressed weight
tensor (pruned or quantized) stored as Huffman-coded streams instead of fixed-width fields:

* the **value stream**: the stored integer codes (``int_repr``: linear or log codes, codebook
  indices), never floats. A pruned tensor left in float keeps its values at 32 bits, uncoded;
* the **gap stream** of the relative-index layout (:func:`qpexp.core.accounting.relative_entries`:
  4-bit gaps, filler entries carrying the zero code).

Each stream costs the cheaper of its fixed width (``b`` bits a code, 4 bits a gap) and its Huffman
code (the sum of code lengths) plus the code table, and one bit saying which. The table is a
canonical Huffman table: one code length per symbol of the alphabet (``2^b`` codes, 16 gaps) in
``LEN_BITS`` = 5 bits, absent symbols length 0 (a stream whose longest code exceeds 31 bits keeps
its fixed width). The three layouts, after coding, are

    dense     values(all n codes)
    bitmask   n + values(nnz codes)                  (the bitmask itself uncoded)
    relative  gaps(entries) + values(entry codes)
    rowcol    r + c + 3 + gaps(entries') + values(entry' codes)   (2-d or more: the relative layout
                                          over the rows and columns holding a stored position, with
                                          the cheapest gap width g in 1..8 in a 3-bit field)

and the cheapest plus its format flag (:func:`~qpexp.core.accounting.flag_bits`) is the tensor's
size. Everything else (biases, scales, codebooks, zero points, float tensors, shared weights) is
counted exactly as ``size_bits`` counts it.

:func:`paper_sizes` counts the way Deep Compression's Tables 2-3 do: weights and indices only (the
relative layout with the Tables' 5-bit indices, :data:`PAPER_INDEX_BITS`; value bits + index bits per
entry; with Huffman, the coded payloads without tables), against 32 bits per conv/linear weight; no
biases, codebooks, code tables or format flags.
"""

from __future__ import annotations

import copy
import heapq

import numpy as np
import torch

from qpexp.core.accounting import (
    DENSE_PARAMS_ATTR,
    FLOAT_BITS,
    GAP_FIELD_BITS,
    INDEX_BITS,
    ROWCOL_GAP_BITS,
    flag_bits,
    layer_views,
    relative_entries,
    rowcol_entries,
    size_bits,
    unique_views,
)
from qpexp.core.prune.masks import get_mask

LEN_BITS = 5  # a canonical table stores each symbol's code length in this many bits
MAX_LEN = 2**LEN_BITS - 1
CHOICE_BITS = 1  # per stream: fixed width or Huffman
# Deep Compression's Tables 2-3 (arXiv:1510.00149v5): "Index bits (P+Q)" is 5 for every layer of both
# LeNets (the text's 4-bit index is AlexNet's). The paper's-way count uses it; qpexp's files INDEX_BITS.
PAPER_INDEX_BITS = 5


def huffman_code_lengths(freqs) -> np.ndarray:
    """Code length of each symbol of a Huffman code for ``freqs`` (counts indexed by symbol).

    Standard Huffman (repeatedly merge the two least frequent subtrees; ties by creation order, so
    deterministic). Absent symbols (count 0) get length 0; a single present symbol gets length 1.
    """
    f = np.asarray(freqs, dtype=np.int64).reshape(-1)
    if (f < 0).any():
        raise ValueError("huffman_code_lengths: frequencies must be >= 0")
    lengths = np.zeros(f.size, np.int64)
    present = np.flatnonzero(f)
    if present.size == 1:
        lengths[present] = 1
    if present.size <= 1:
        return lengths
    heap = [(int(f[s]), i, [int(s)]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        fa, _, a = heapq.heappop(heap)
        fb, _, b = heapq.heappop(heap)
        lengths[a + b] += 1
        heapq.heappush(heap, (fa + fb, order, a + b))
        order += 1
    return lengths


def stream_bits(symbols: np.ndarray, alphabet: int, width: int) -> dict:
    """Cost of one stream of integer ``symbols`` in ``[0, alphabet)``: ``bits`` (the cheaper of fixed
    width and Huffman + table, plus the choice bit), ``huffman_payload`` (sum of code lengths)."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    fixed = symbols.size * width
    if symbols.size == 0:
        return {"bits": CHOICE_BITS, "huffman_payload": 0, "coded": False}
    lengths = huffman_code_lengths(np.bincount(symbols, minlength=alphabet))
    payload = int((lengths[symbols]).sum())
    huff = payload + alphabet * LEN_BITS if lengths.max() <= MAX_LEN else None
    coded = huff is not None and huff < fixed
    return {"bits": (huff if coded else fixed) + CHOICE_BITS, "huffman_payload": payload, "coded": coded}


def coded_layouts(
    codes: np.ndarray, keep: np.ndarray, bits: int, gap_bits: int = INDEX_BITS, rows: int | None = None
) -> dict:
    """Each layout's coded size for flat integer ``codes`` (values in a ``2^bits`` alphabet after
    subtracting their minimum) and the flat mask ``keep`` of stored (nonzero) positions; the relative
    layout with ``gap_bits`` a gap. ``rows``: the tensor's first dimension (2-d or more), which adds
    the rowcol layout (``entries`` stays the relative layout's)."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    alphabet = 2**bits
    sym = codes - (codes.min() if codes.size else 0)
    if sym.size and sym.max() >= alphabet:
        raise ValueError(f"coded_layouts: codes span {int(sym.max()) + 1} values, more than 2^{bits}")
    gaps, pos = relative_entries(keep, gap_bits)
    values = stream_bits(sym[pos], alphabet, bits)
    index = stream_bits(gaps, 2**gap_bits, gap_bits)
    options = {
        "dense": stream_bits(sym, alphabet, bits)["bits"],
        "bitmask": keep.size + stream_bits(sym[keep], alphabet, bits)["bits"],
        "relative": index["bits"] + values["bits"],
    }
    if rows:
        options["rowcol"] = rowcol_coded(
            keep.reshape(rows, -1), lambda p: stream_bits(sym[p], alphabet, bits)["bits"]
        )
    return {"options": options, "entries": int(gaps.size), "values": values, "index": index}


def rowcol_coded(keep: np.ndarray, value_bits) -> int:
    """The coded rowcol layout of a ``(rows, cols)`` mask: row and column bits, the gap-width field,
    the coded gap stream and ``value_bits(positions)`` (the value stream's cost), at the cheapest gap
    width of :data:`~qpexp.core.accounting.ROWCOL_GAP_BITS`."""
    fixed = keep.shape[0] + keep.shape[1] + GAP_FIELD_BITS
    best = None
    for g in ROWCOL_GAP_BITS:
        d, p, _, _ = rowcol_entries(keep, g)
        cost = fixed + stream_bits(d, 2**g, g)["bits"] + value_bits(p)
        best = cost if best is None else min(best, cost)
    return best


def float_layouts(keep: np.ndarray, gap_bits: int = INDEX_BITS, rows: int | None = None) -> dict:
    """A pruned float tensor: values at 32 bits (uncoded), the gap stream coded."""
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    gaps, _ = relative_entries(keep, gap_bits)
    index = stream_bits(gaps, 2**gap_bits, gap_bits)
    nnz = int(keep.sum())
    options = {
        "dense": keep.size * FLOAT_BITS,
        "bitmask": nnz * FLOAT_BITS + keep.size,
        "relative": index["bits"] + gaps.size * FLOAT_BITS,
    }
    if rows:
        options["rowcol"] = rowcol_coded(keep.reshape(rows, -1), lambda p: p.size * FLOAT_BITS)
    values = {"bits": gaps.size * FLOAT_BITS, "huffman_payload": gaps.size * FLOAT_BITS, "coded": False}
    return {"options": options, "entries": int(gaps.size), "values": values, "index": index}


@torch.no_grad()
def view_layouts(v, gap_bits: int = INDEX_BITS, rowcol: bool = True) -> dict:
    """:func:`coded_layouts` (or :func:`float_layouts`) of one layer view's stored weight: the codes of a
    copy of its quantizer in eval mode (no state changes), stored positions = nonzero effective weights;
    ``rowcol=False`` leaves the rowcol layout out (the paper's count does not use it)."""
    w = v.weight.detach()
    rows = w.shape[0] if w.dim() >= 2 and rowcol else None
    if v.wq is None:
        return float_layouts((w.reshape(-1) != 0).cpu().numpy(), gap_bits, rows)
    q = copy.deepcopy(v.wq).eval()
    eff = q(w)  # initializes the copy as the first forward would
    codes = q.int_repr(w).reshape(-1).cpu().numpy()
    return coded_layouts(codes, (eff.reshape(-1) != 0).cpu().numpy(), v.bits_w, gap_bits, rows)


def size_bits_huffman(model, detail: bool = False):
    """Total storage in bits with every compressed weight tensor Huffman-coded (module doc).

    With ``detail``: ``(total, rows)``, ``rows[name]`` holding ``bits`` (the tensor's coded size, flag
    included), ``format`` and ``entries`` (of its relative layout; the paper's per-layer columns are
    :func:`paper_sizes`')."""
    total, rows, _ = size_bits(model, detail=True)
    views = {v.name: v for v in layer_views(model)}
    out = {}
    for name, r in rows.items():
        if r["format"] in ("float", "shared"):
            continue
        lay = view_layouts(views[name])
        fmt = min(lay["options"], key=lambda k: lay["options"][k] + flag_bits(k))
        bits = lay["options"][fmt] + flag_bits(fmt)
        total += bits - r["weight_bits"]
        out[name] = {"bits": bits, "format": fmt, "entries": lay["entries"]}
    return (total, out) if detail else total


def paper_sizes(model, dense_params: int | None = None) -> dict:
    """Deep Compression's count (Tables 2-3): ``dense`` = 32 bits per conv/linear weight of the dense
    model; ``pq`` = per compressed tensor, relative-layout entries x (value bits + :data:`PAPER_INDEX_BITS`
    index bits); ``pqh`` = the Huffman payloads of the value and gap streams (no tables); ``layers``:
    per compressed tensor the mean code length of its value and gap streams (the Tables' "Weight bits"
    and "Index bits (P+Q+H)" columns). Uncompressed weights at 32 bits; biases, codebooks, scales,
    tables and flags not counted (as the paper's tables)."""
    dense = FLOAT_BITS * (dense_params or getattr(model, DENSE_PARAMS_ATTR, None) or 0)
    pq = pqh = n = 0
    layers = {}
    for v in unique_views(model):
        n += v.weight.numel()
        compressed = v.wq is not None or get_mask(v.layer, v.param) is not None  # as size_bits
        if not compressed:
            pq += v.weight.numel() * FLOAT_BITS
            pqh += v.weight.numel() * FLOAT_BITS
            continue
        lay = view_layouts(v, PAPER_INDEX_BITS, rowcol=False)
        pq += lay["entries"] * (v.bits_w + PAPER_INDEX_BITS)
        pqh += lay["values"]["huffman_payload"] + lay["index"]["huffman_payload"]
        e = max(lay["entries"], 1)
        layers[v.name] = {
            "bits_per_weight": lay["values"]["huffman_payload"] / e,
            "bits_per_index": lay["index"]["huffman_payload"] / e,
        }
    dense = dense or FLOAT_BITS * n
    return {"dense": dense, "pq": pq, "pqh": pqh, "layers": layers}


def huffman_record(model, dense_bits: int, dense_params: int | None = None) -> dict:
    """The record keys: ``final/size_bits_huffman``, ``final/compression_ratio_huffman`` (honest: the
    dense model's ``size_bits`` over the coded total), the paper's-way ratios
    ``final/paper_ratio`` (P+Q) and ``final/paper_ratio_huffman`` (P+Q+H), and per compressed layer
    ``layers/<name>/huffman_format`` (the honest count's layout) and ``huffman_bits_per_weight`` /
    ``huffman_bits_per_index`` (the paper's Tables 2-3 columns, on its layout: :func:`paper_sizes`)."""
    total, rows = size_bits_huffman(model, detail=True)
    paper = paper_sizes(model, dense_params)
    out = {
        "final/size_bits_huffman": total,
        "final/compression_ratio_huffman": dense_bits / total,
        "final/paper_size_bits": paper["pq"],
        "final/paper_size_bits_huffman": paper["pqh"],
        "final/paper_ratio": paper["dense"] / max(paper["pq"], 1),
        "final/paper_ratio_huffman": paper["dense"] / max(paper["pqh"], 1),
    }
    for name, r in rows.items():
        out[f"layers/{name}/huffman_format"] = r["format"]
    for name, r in paper["layers"].items():
        out[f"layers/{name}/huffman_bits_per_weight"] = r["bits_per_weight"]
        out[f"layers/{name}/huffman_bits_per_index"] = r["bits_per_index"]
    return out
