"""The rowcol layout: a bit per row and per column, then the relative layout over the live block.

Counted by hand here (the accounting's formula written out), written and read back by the integer
file, coded by the Huffman count, and refused when a hand-made file's bits do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_nm_file import encode_decode

from qpexp.core.accounting import rowcol_bits, rowcol_entries, tensor_bits
from qpexp.core.huffman import coded_layouts
from qpexp.core.quant import package as P


def _keep(width: int = 20) -> np.ndarray:
    keep = np.zeros((4, width), bool)
    keep[1, 0] = keep[1, 5] = keep[3, 5] = True
    return keep


def test_rowcol_by_hand():
    """Rows 1 and 3, columns 0 and 5 live: the block [[1, 1], [0, 1]] stores positions 0, 1, 3 of 4,
    gaps 0, 0, 1 and no filler; full-tensor positions 20, 25, 65. The relative layout over all 80
    positions needs gaps 20 (a filler of 16, then 4), 4 and 39 (two fillers, then 7): 6 entries."""
    d, pos, rows, cols = rowcol_entries(_keep())
    assert d.tolist() == [0, 0, 1] and pos.tolist() == [20, 25, 65]
    assert rows.tolist() == [False, True, False, True] and np.flatnonzero(cols).tolist() == [0, 5]
    t = tensor_bits(torch.from_numpy(_keep()).float(), 8)
    # rowcol at 1-bit gaps (no filler: every gap < 2): 4 + 20 + 3 (the width field) + 3 x (8 + 1) = 54;
    # relative 6 x (8 + 4) = 72; bitmask 3 x 8 + 80 = 104; dense 640; flags 111 and 10
    assert t == {"bits": 54 + 3, "format": "rowcol", "n": 80, "nnz": 3}
    # at 4-bit gaps it would be 4 + 20 + 3 + 3 x 12 = 63: the width is the cheapest
    assert rowcol_bits(_keep(), 8) == (54, 1)
    # codes with no pattern free for a filler: only the widths that need none (here every width)
    assert rowcol_bits(_keep(), 8, fillers=False) == (54, 1)


def test_relative_when_every_row_and_column_is_live():
    keep = np.eye(6, dtype=bool)  # 6 entries of gap 0, 6, 6, ...: the row/column bits are extra
    t = tensor_bits(torch.from_numpy(keep).float(), 8)
    assert t["format"] == "relative" and t["bits"] == 6 * 12 + 2


def test_huffman_rowcol_by_hand():
    """Codes 3, 3, 5 at 4 bits over the hand-made mask. rowcol at 1-bit gaps: the gap stream 0, 0, 1
    fixed (3 bits) beats Huffman (3 code bits + a 2-length table of 10), the value stream fixed
    (12) beats Huffman (3 + a 16-length table of 80), each plus its choice bit:
    4 + 20 + 3 + 4 + 13 = 44. relative: 6 entries of 4-bit gaps 15, 4, 4, 15, 15, 7 (fillers carry
    the zero code) and values 0, 3, 3, 0, 0, 5, each 24 fixed + 1: 50."""
    keep = _keep()
    codes = np.zeros(80, np.int64)
    codes[[20, 25, 65]] = [3, 3, 5]
    lay = coded_layouts(codes, keep.reshape(-1), 4, rows=4)
    assert lay["options"]["rowcol"] == 44
    assert lay["options"]["relative"] == 25 + 25
    assert "rowcol" not in coded_layouts(codes, keep.reshape(-1), 4)["options"]  # 1-d: no rows


def _ir(keep: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    codes = np.where(keep, rng.integers(1, 8, keep.shape), 0).astype(np.int32)
    return {"bits": 4, "shape": list(keep.shape), "per_channel": False, "ch_axis": 0, "mask": keep,
            "scheme": "linear", "symmetric": True, "qmin": -7, "qmax": 7,
            "scale": np.ones(1, np.float32), "zero_point": None, "codes": codes}  # fmt: skip


def test_file_roundtrip_in_rowcol_with_fillers():
    """A 6 x 3 x 3 x 3 conv weight whose live block still needs fillers (a run of 16+ positions)."""
    keep = np.zeros((6, 27), bool)
    keep[0, 0] = keep[0, 26] = keep[4, 26] = keep[5, 13] = True  # row 1-3 dead; columns 0, 13, 26 live
    ir = _ir(keep.reshape(6, 3, 3, 3))
    entry, got = encode_decode(ir, nm=None)
    assert entry["layout"] == "rowcol"
    np.testing.assert_array_equal(got["codes"], ir["codes"])
    np.testing.assert_array_equal(got["mask"], ir["mask"])
    counted = tensor_bits(torch.from_numpy(keep.reshape(6, 3, 3, 3)).float(), 4)
    assert entry["payload_bits"] == counted["bits"] and counted["format"] == "rowcol"


@pytest.mark.parametrize("damage", ["rows_short", "cols_missing", "gap_past_block"])
def test_hand_made_rowcol_that_does_not_fit_is_refused(damage):
    blob = P._Blob()
    # 4 + 40 + 3 + 3 x (4 + 1) = 62 bits (+ 3) against the relative layout's 9 entries x 8 = 72 (+ 2)
    entry = json.loads(json.dumps(P._encode_weight(_ir(_keep(40)), blob)))
    assert entry["layout"] == "rowcol"
    raw = np.frombuffer(b"".join(blob.parts), np.uint8).copy()
    if damage == "rows_short":
        entry["rows"]["count"] = 3
    elif damage == "cols_missing":
        del entry["cols"]
    else:  # the last gap jumps past the 2 x 2 live block
        seg = entry["positions"]
        raw[seg["offset"]] = 0xFF  # 1-bit gaps 1, 1, 1: positions 1, 3, 5 of a block of 4
    with pytest.raises(ValueError, match="layer 'w'.*rowcol"):
        P._decode_weight(entry, raw, "w")


def _formula(keep: np.ndarray, bits: int, fillers: bool) -> tuple[int, int] | None:
    """The rowcol cost written out: block of live rows and columns, gaps d between its kept positions
    (row-major), sum(d // 2^g) fillers at g-bit gaps; the cheapest g (only filler-free ones when asked)."""
    block = keep[keep.any(1)][:, keep.any(0)].reshape(-1)
    d = np.diff(np.flatnonzero(block), prepend=-1) - 1
    best = None
    for g in range(1, 9):
        pad = int((d // 2**g).sum())
        if fillers or pad == 0:
            cost = keep.shape[0] + keep.shape[1] + 3 + (len(d) + pad) * (bits + g)
            best = (cost, g) if best is None or cost < best[0] else best
    return best


@pytest.mark.parametrize("fillers", [True, False])
def test_rowcol_gap_width_is_the_cheapest_allowed(fillers):
    keep = np.zeros((2, 41), bool)
    keep[0, :10] = keep[0, 40] = keep[1, 10:40:7] = True  # ten in a row, then long runs of zeros
    rng = np.random.default_rng(0)
    sparse = rng.random((12, 50)) < 0.05
    for k in (keep, sparse):
        for bits in (2, 4, 8):
            assert rowcol_bits(k, bits, fillers) == _formula(k, bits, fillers)
    assert rowcol_bits(keep, 2)[1] < rowcol_bits(keep, 2, fillers=False)[1]  # fillers pay at 2 bits


def test_which_codes_leave_a_filler_pattern_free():
    from qpexp.core.accounting import filler_free
    from qpexp.core.quant import QuantSpec
    from qpexp.core.quant.linear import LinearQuantizer

    assert filler_free(None)  # float: NaN
    sym = LinearQuantizer(QuantSpec(4, symmetric=True), is_weight=True)  # [-7, 7]: -8 is free
    asym = LinearQuantizer(QuantSpec(4, symmetric=False), is_weight=True)  # [0, 15]: every pattern taken
    assert (sym.qmin, sym.qmax) == (-7, 7) and filler_free(sym)
    assert (asym.qmin, asym.qmax) == (0, 15) and not filler_free(asym)
