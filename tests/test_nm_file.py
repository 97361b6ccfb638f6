"""Issue 24: the integer file stores N:M-sparse weights in the N:M layout.

Every expectation is written out: the 2:4 ranks as a table, the 4:8 ranks against
``itertools.combinations``, the payload bits of a layer from its shape.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.accounting import size_bits, tensor_bits
from qpexp.core.prune.masks import set_mask
from qpexp.core.prune.nm import nm_mask, rank_combination, unrank_combination
from qpexp.core.quant import QuantConfig, QuantSpec, quant_layers, quantize_
from qpexp.core.quant import package as P
from qpexp.core.quant.export import convert, load, load_ops, package_stats, read_package
from qpexp.core.quant.graph_export import decode_graph
from qpexp.models import cnn1d

torch.set_num_threads(1)


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- the rank of a kept set ------------------------------------------------------------------------
TWO_OF_FOUR = {(0, 1): 0, (0, 2): 1, (0, 3): 2, (1, 2): 3, (1, 3): 4, (2, 3): 5}  # lexicographic


def test_rank_and_unrank_2_of_4_by_hand():
    cols = torch.tensor(list(TWO_OF_FOUR))
    assert rank_combination(cols, 4).tolist() == list(TWO_OF_FOUR.values())
    assert [tuple(c) for c in unrank_combination(torch.arange(6), 4, 2).tolist()] == list(TWO_OF_FOUR)
    # any leading shape
    assert rank_combination(cols.reshape(2, 3, 2), 4).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("m, k", [(8, 4), (3, 2), (5, 1), (7, 7)])
def test_rank_and_unrank_against_itertools(m, k):
    sets = list(itertools.combinations(range(m), k))  # lexicographic order
    cols = torch.tensor(sets).reshape(len(sets), k)
    assert rank_combination(cols, m).tolist() == list(range(math.comb(m, k)))
    exact(unrank_combination(torch.arange(len(sets)), m, k), cols)


def test_rank_refuses_what_is_not_a_set():
    with pytest.raises(ValueError, match="strictly increasing"):
        rank_combination(torch.tensor([[1, 1]]), 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        rank_combination(torch.tensor([[1, 4]]), 4)
    with pytest.raises(ValueError, match=r"C\(4, 2\) = 6"):
        unrank_combination(torch.tensor([6]), 4, 2)


# -- a 2:4-pruned, 4-bit quantized model in the file -------------------------------------------------
def nm_model(channels: int, n: int = 2, m: int = 4, bits: int = 4, symmetric: bool = True):
    """The MNIST-1D CNN, every layer N:M-pruned by magnitude, then quantized and calibrated."""
    torch.manual_seed(0)
    model = cnn1d((40,), 10, channels=channels)
    for layer in model.modules():
        if isinstance(layer, (nn.Conv1d, nn.Linear)):
            set_mask(layer, nm_mask(layer.weight.detach().abs(), n, m))
    spec_w = QuantSpec(bits=bits, granularity="channel", symmetric=symmetric, range="minmax")
    quantize_(model, QuantConfig(weight=spec_w, act=QuantSpec(bits=8, symmetric=False, range="minmax")))
    model.train()
    model(torch.randn(64, 40))
    return model.eval()


def weights(path, graph: bool = False) -> dict:
    header, blob = read_package(path)
    meta = json.loads(header)
    entries = {o["name"]: o["weight"] for o in meta["nodes" if graph else "ops"] if "weight" in o}
    decoded = decode_graph(header, blob) if graph else load_ops(path)
    return entries, {o["name"]: o["weight"] for o in decoded if "weight" in o}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_2_4_model_roundtrip_in_the_nm_layout(tmp_path, suffix):
    model = nm_model(channels=24)  # conv2, conv3: 72 columns = 18 groups of 4; conv1: 5 = 4 + 1
    path = tmp_path / f"m{suffix}"
    convert(model, path, nm=(2, 4))
    entries, decoded = weights(path)
    assert {e["layout"] for e in entries.values()} == {"nm"}
    for name, w in quant_layers(model):
        got = decoded[name]
        exact(torch.from_numpy(got["codes"]), w.wq.int_repr(w.layer.weight).to(torch.int64))
        exact(torch.from_numpy(got["mask"]), w.layer.weight_mask != 0)
    x = torch.randn(50, 40) * 1.3
    with torch.no_grad():
        exact(load(path, arithmetic="float")(x), model(x))  # bit for bit
    # conv2 by hand: 24 rows x 18 groups x (2 codes x 4 bits + 3 index bits), plus the 3-bit flag (110)
    conv2 = entries["conv2"]
    assert conv2["payload_bits"] == 24 * 18 * (2 * 4 + 3) + 3
    assert conv2["nm"] == [2, 4] and conv2["tail_positions"] is None
    assert conv2["positions"]["bits"] == 3 and conv2["positions"]["nbytes"] == math.ceil(24 * 18 * 3 / 8)
    assert conv2["values"]["nbytes"] == math.ceil(24 * 18 * 2 * 4 / 8)
    # the file's payload agrees with the formulas, and with the accounting's N:M count
    st = package_stats(path)
    assert st["accounted_payload_bits"] == size_bits(model, nm=(2, 4)) < size_bits(model)
    assert 0 <= st["payload_bytes"] * 8 - (st["accounted_payload_bits"] - 4 * 3) < 8 * 4 * 7


def test_short_last_group(tmp_path):
    """25 channels: conv2's rows are 75 = 18 x 4 + 3 columns, the short group keeps 2 of 3
    (C(3, 2) = 3 sets: 2 index bits); conv1's rows are 5 = 4 + 1 (keeps its 1: no index bits)."""
    model = nm_model(channels=25)
    convert(model, tmp_path / "m.npz", nm=(2, 4))
    entries, decoded = weights(tmp_path / "m.npz")
    conv2, conv1 = entries["conv2"], entries["conv1"]
    assert conv2["layout"] == conv1["layout"] == "nm"
    assert conv2["payload_bits"] == 25 * (18 * (2 * 4 + 3) + 2 * 4 + 2) + 3
    assert conv2["tail_positions"]["bits"] == 2 and conv2["tail_positions"]["count"] == 25
    assert conv1["payload_bits"] == 25 * ((2 * 4 + 3) + 1 * 4 + 0) + 3
    for name, w in quant_layers(model):
        exact(torch.from_numpy(decoded[name]["codes"]), w.wq.int_repr(w.layer.weight).to(torch.int64))
        exact(torch.from_numpy(decoded[name]["mask"]), w.layer.weight_mask != 0)
    x = torch.randn(20, 40)
    with torch.no_grad():
        exact(load(tmp_path / "m.npz", arithmetic="float")(x), model(x))
    assert package_stats(tmp_path / "m.npz")["accounted_payload_bits"] == size_bits(model, nm=(2, 4))


def test_graph_format_writes_the_nm_layout_too(tmp_path):
    model = nm_model(channels=24, symmetric=False)  # asymmetric: no filler code, every group full
    convert(model, tmp_path / "g.npz", graph=True, nm=(2, 4))
    entries, decoded = weights(tmp_path / "g.npz", graph=True)
    assert {e["layout"] for e in entries.values()} == {"nm"}
    for name, w in quant_layers(model):
        got = decoded[f"{name}.layer.weight"]
        exact(torch.from_numpy(got["codes"]), w.wq.int_repr(w.layer.weight).to(torch.int64))
        exact(torch.from_numpy(got["mask"]), w.layer.weight_mask != 0)
    x = torch.randn(20, 40)
    with torch.no_grad():
        exact(load(tmp_path / "g.npz", arithmetic="float")(x), model(x))


def test_without_nm_or_when_groups_hold_more_the_file_is_as_before(tmp_path):
    model = nm_model(channels=24)
    convert(model, tmp_path / "a.npz")
    convert(model, tmp_path / "b.npz", nm=(1, 4))  # 2 kept in a group of 4: no 1:4 layout
    for path in (tmp_path / "a.npz", tmp_path / "b.npz"):
        assert "nm" not in {e["layout"] for e in weights(path)[0].values()}
    assert read_package(tmp_path / "a.npz")[0] == read_package(tmp_path / "b.npz")[0]


# -- the layout on hand-made weights: fewer kept than stored, widths below m, float ----------------
def weight_ir(shape, symmetric=True, pruned=True, scheme="linear", full_range=False):
    """A 2:4 mask with one group keeping only 1 (its first kept position dropped)."""
    rng = np.random.default_rng(3)
    mask = nm_mask(torch.from_numpy(rng.standard_normal(shape)), 2, 4).numpy().astype(bool)
    mask.reshape(-1)[np.flatnonzero(mask)[0]] = False
    if scheme == "float":
        values = np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)
        return {"scheme": "float", "shape": list(shape), "values": values, "mask": mask if pruned else None}
    qmin, qmax, zero = (-8 if full_range else -7, 7, 0) if symmetric else (0, 15, 8)
    zp = None if symmetric else np.full(shape[0], zero, np.int32)
    codes = np.where(mask, rng.integers(qmin, qmax + 1, shape), zero)
    if pruned:  # kept codes that mean 0.0 (stored: the file keeps the mask)
        codes[mask & (rng.random(shape) < 0.2)] = zero
    else:  # the nonzero codes are the 2:4 pattern
        codes[mask & (codes == zero)] = zero + 1
    ir = {
        "bits": 4,
        "shape": list(shape),
        "per_channel": True,
        "ch_axis": 0,
        "mask": mask if pruned else None,
    }
    ir.update(scheme="linear", symmetric=symmetric, qmin=qmin, qmax=qmax, scale=np.ones(shape[0], np.float32))
    return {**ir, "zero_point": zp, "codes": codes.astype(np.int32)}


def encode_decode(ir, nm=(2, 4)):
    blob = P._Blob()
    entry = json.loads(json.dumps(P._encode_weight(ir, blob, nm)))  # as the header stores it
    return entry, P._decode_weight(entry, np.frombuffer(b"".join(blob.parts), np.uint8).copy(), "w")


@pytest.mark.parametrize("shape", [(6, 3), (5, 10), (4, 2, 4), (9, 16)])  # no full group; 2 + short 2; 8
@pytest.mark.parametrize(
    "kind", [{}, {"pruned": False}, {"scheme": "float"}, {"symmetric": False}, {"full_range": True}]
)
def test_groups_keeping_fewer_come_back_exactly(shape, kind):
    ir = weight_ir(shape, **kind)
    entry, got = encode_decode(ir)
    key = "values" if ir["scheme"] == "float" else "codes"
    np.testing.assert_array_equal(got[key], ir[key])
    if ir["mask"] is None:
        assert got["mask"] is None
    else:
        np.testing.assert_array_equal(got["mask"], ir["mask"])
    # the layout and its bits are the accounting's choice for what the file stores: the mask, or
    # (unpruned) the nonzero codes
    keep = ir["mask"] if ir["mask"] is not None else ir[key] != (8 if kind == {"symmetric": False} else 0)
    counted = tensor_bits(torch.from_numpy(keep).float(), 32 if key == "values" else 4, nm=(2, 4))
    if kind in ({"symmetric": False}, {"full_range": True}):  # every one of the 16 codes is taken:
        # no filler code can mark the stored position outside the mask
        assert counted["format"] == "nm" and entry["layout"] == "bitmask"
    else:
        assert (entry["layout"], entry["payload_bits"]) == (counted["format"], counted["bits"])
        # float: the short group costs 1 x 32 + 4 bits as a bitmask against 2 x 32 + 3, every full
        # group 68 against 67: the N:M layout pays off from 33 groups (9 x 16 has 36)
        assert entry["layout"] == ("bitmask" if key == "values" and shape != (9, 16) else "nm")


def test_asymmetric_full_groups_take_the_nm_layout():
    ir = weight_ir((5, 10), symmetric=False)
    ir["mask"] = nm_mask(torch.from_numpy(np.abs(ir["codes"] - 8.0) + 1), 2, 4).numpy().astype(bool)
    ir["codes"] = np.where(ir["mask"], ir["codes"], 8).astype(np.int32)
    entry, got = encode_decode(ir)
    assert entry["layout"] == "nm"
    np.testing.assert_array_equal(got["codes"], ir["codes"])
    np.testing.assert_array_equal(got["mask"], ir["mask"])
