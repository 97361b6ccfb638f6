"""Issue 3: the integer model file (exact round trip, packing, pruning layout, size accounting), the
ONNX QDQ model in onnxruntime, and PTQ/QAT end to end with the deploy record."""

from __future__ import annotations

import math
import os
import zipfile
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpexp.core.accounting import relative_entries, relative_index_padding, size_bits
from qpexp.core.prune.masks import set_mask
from qpexp.core.quant import QuantConfig, QuantSpec, quant_layers, quantize_
from qpexp.core.quant.export import (
    IntegerLayer,
    convert,
    load,
    load_ops,
    model_ir,
    pack_bits,
    package_stats,
    read_package,
    unpack_bits,
)
from qpexp.models import cnn1d, lenet5

torch.set_num_threads(1)


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def prepared(
    model=None,
    bits_w=4,
    bits_a=8,
    scheme="linear",
    act_scheme="linear",
    granularity="channel",
    symmetric=True,
    act_symmetric=False,
    range_="minmax",
    prune=0.0,
    x=None,
    narrow_range=True,
    **cfg,
):
    torch.manual_seed(0)
    model = model or cnn1d((40,), 10)
    if prune:
        for _, layer in [
            (n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
        ]:
            set_mask(layer, (torch.rand_like(layer.weight) > prune).float())
    spec_w = QuantSpec(
        bits=bits_w,
        scheme=scheme,
        granularity=granularity,
        symmetric=symmetric,
        range=range_,
        narrow_range=narrow_range,
    )
    spec_a = QuantSpec(bits=bits_a, scheme=act_scheme, symmetric=act_symmetric, range="minmax")
    quantize_(model, QuantConfig(weight=spec_w, act=spec_a, **cfg))
    x = torch.randn(64, 40) if x is None else x
    model.train()
    model(x)
    return model.eval()


CASES = {
    "w8a8": {"bits_w": 8},
    "w4a8_pruned": {"bits_w": 4, "prune": 0.7},
    "w2a8_pruned95": {"bits_w": 2, "prune": 0.95},
    "w3a4_tensor_asym_pruned": {
        "bits_w": 3,
        "bits_a": 4,
        "granularity": "tensor",
        "symmetric": False,
        "prune": 0.5,
    },
    "w16a16_asym": {"bits_w": 16, "bits_a": 16, "symmetric": False, "act_symmetric": True},
    "w5a6_sym_acts": {"bits_w": 5, "bits_a": 6, "act_symmetric": True},
    "w4_lsq": {"bits_w": 4, "range_": "lsq"},
    "w2_lsq_full_range_pruned": {"bits_w": 2, "range_": "lsq", "narrow_range": False, "prune": 0.5},
    "w8_lsq_full_range": {"bits_w": 8, "range_": "lsq", "narrow_range": False, "granularity": "tensor"},
    # full range: every one of the 2^b patterns is a code, none is free for the relative layout's filler
    "w4_full_range_pruned97": {"bits_w": 4, "narrow_range": False, "prune": 0.97},
    "w8_full_range_pruned97": {"bits_w": 8, "narrow_range": False, "prune": 0.97, "granularity": "tensor"},
    "log4_pruned": {"bits_w": 4, "scheme": "log", "prune": 0.9},
    "log3_log_acts": {"bits_w": 3, "scheme": "log", "act_scheme": "log", "granularity": "tensor"},
    "companding4": {"bits_w": 4, "scheme": "companding", "act_scheme": "companding"},
    "mixed_first_last_float": {"bits_w": 4, "first_bits": 8, "last_bits": 6, "overrides": {"conv2": 32}},
    "float_acts": {"bits_w": 6, "bits_a": 32},
}


def wrappers(model):
    return [m for _, m in quant_layers(model)]


# -- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_roundtrip_is_exact(tmp_path, case, suffix):
    model = prepared(**CASES[case])
    x = torch.randn(50, 40) * 1.3
    path = tmp_path / f"m{suffix}"
    int_model = convert(model, path)
    assert path.exists()
    exact_model = load(path, arithmetic="float")
    with torch.no_grad():
        ref = model(x)
        exact(exact_model(x), ref)  # dequantized with the kernel's arithmetic: bit for bit
    layers = exact_model.integer_layers()
    assert len(layers) == 4
    for w, layer in zip(wrappers(model), layers):
        if w.wq is not None:
            exact(layer.weight_codes, w.wq.int_repr(w.layer.weight))
        mask = getattr(w.layer, "weight_mask", None)
        if mask is not None:
            exact(layer.weight_mask, mask != 0)
    # input-activation codes, layer by layer
    seen = []
    hooks = [
        w.register_forward_pre_hook(lambda m, i: seen.append(m.aq.int_repr(i[0])))
        for w in wrappers(model)
        if w.aq
    ]
    for layer in layers:
        layer.keep_codes = True
    with torch.no_grad():
        model(x)
        exact_model(x)
    for h in hooks:
        h.remove()
    mine = [la.last_act_codes for la in layers if la.last_act_codes is not None]
    assert len(mine) == len(seen)
    for a, b in zip(seen, mine):
        exact(a, b)
    with torch.no_grad():
        torch.testing.assert_close(int_model(x).argmax(1), ref.argmax(1), atol=0, rtol=0)


@pytest.mark.parametrize(
    "case", ["w8a8", "w4a8_pruned", "w3a4_tensor_asym_pruned", "w16a16_asym", "float_acts"]
)
def test_integer_accumulation_is_exact(tmp_path, case):
    """The integer path's accumulator equals an int64 reference (im2col + integer matmul), and the
    layer output is ``acc * S_x S_w + bias``."""
    model = prepared(**CASES[case])
    int_model = convert(model, tmp_path / "m.npz")
    x = torch.randn(20, 40)
    for layer in int_model:
        if isinstance(layer, IntegerLayer) and layer.integer:
            acc, mult = layer.accumulate(x)
            wi = (layer.weight_codes.long() - layer.w_zero.long()).reshape(layer.weight_codes.shape[0], -1)
            q = layer.act_codes(x)
            xi = x if q is None else q - layer.a_zero
            if layer.kind == "Linear":
                cols = xi.long() if q is not None else None
                ref = cols @ wi.T if cols is not None else None
            else:
                k, s, p = (
                    wi.shape[1] // xi.shape[1],
                    layer.conv_args["stride"][0],
                    layer.conv_args["padding"][0],
                )
                unf = F.unfold(xi.unsqueeze(-1), (k, 1), padding=(p, 0), stride=(s, 1))  # N, C*k, L
                ref = (unf.round().long().transpose(1, 2) @ wi.T).transpose(1, 2) if q is not None else None
            if ref is not None:
                exact(acc, ref.double())
            shape = [1, -1] + [1] * (acc.dim() - 2)
            want = (acc * (mult.reshape(shape) if mult.numel() > 1 else mult.reshape([]))).float()
            want = want + layer.bias.reshape(shape)
            exact(layer(x), want)
        x = layer(x)


def test_integer_arithmetic_matches_within_float_rounding(tmp_path):
    model = prepared(bits_w=8)
    int_model = convert(model, tmp_path / "m.npz", arithmetic="integer")
    assert all(la.integer for la in int_model.integer_layers())
    x = torch.randn(200, 40)
    with torch.no_grad():
        ref, got = model(x), int_model(x)
    # a value on a rounding edge may flip one activation code (a step of S), nothing more
    assert float((got - ref).abs().max()) < 0.05
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.99


def test_convert_without_path_returns_the_same_model():
    model = prepared(bits_w=4, prune=0.5)
    x = torch.randn(10, 40)
    with torch.no_grad():
        exact(convert(model, arithmetic="float")(x), model(x))


def test_unfolded_batchnorm_and_2d_pooling_round_trip(tmp_path):
    torch.manual_seed(0)
    net = lenet5((8, 8), 10, batchnorm=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(16, 64)
    model = prepared(net, bits_w=4, fold_bn=False, x=x)
    exact_model = load(convert(model, tmp_path / "m.pt") and tmp_path / "m.pt", arithmetic="float")
    ops = [op["op"] for op in load_ops(tmp_path / "m.pt")]
    assert "BatchNorm" in ops and "MaxPool2d" in ops
    with torch.no_grad():
        exact(exact_model(x), model(x))


def test_unsupported_module_is_refused_naming_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    quantize_(model, QuantConfig())
    model.train()
    model(torch.randn(3, 4))
    with pytest.raises(NotImplementedError, match="1: module type Tanh"):
        convert(model.eval(), tmp_path / "m.npz")


# -- the file --------------------------------------------------------------------------------------
def test_files_load_without_pickle(tmp_path):
    model = prepared(bits_w=4, prune=0.5)
    convert(model, tmp_path / "m.pt")
    convert(model, tmp_path / "m.npz")
    pkg = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(pkg) == {"format", "header", "blob"}
    assert (
        isinstance(pkg["format"], str)
        and pkg["blob"].dtype == torch.uint8
        and pkg["header"].dtype == torch.uint8
    )
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["blob", "header"] and z["blob"].dtype == np.uint8
    h1, b1 = read_package(tmp_path / "m.pt")
    h2, b2 = read_package(tmp_path / "m.npz")
    assert h1 == h2 and np.array_equal(b1, b2)
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        assert len(z.namelist()) == 2  # one header, one blob


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_pack_bits_roundtrip_and_size(bits):
    rng = np.random.default_rng(bits)
    u = rng.integers(0, 2**bits, 1001)
    u[:2] = [0, 2**bits - 1]
    packed = pack_bits(u, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), u)
    with pytest.raises(ValueError):
        pack_bits(np.array([2**bits]), bits)


def test_relative_entries_match_the_accounting_padding():
    rng = np.random.default_rng(0)
    keep = rng.random(5000) > 0.97
    keep[4000:4100] = False  # a long run
    d, pos = relative_entries(keep)
    assert d.min() >= 0 and d.max() <= 15
    assert d.size == int(keep.sum()) + relative_index_padding(torch.from_numpy(keep.astype(np.float32)))
    assert np.array_equal(np.cumsum(d + 1) - 1, pos)
    assert set(np.flatnonzero(keep)) <= set(pos.tolist())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("prune", [0.3, 0.8, 0.97])
def test_pruning_mask_comes_back_exactly(tmp_path, symmetric, prune):
    model = prepared(bits_w=3, symmetric=symmetric, prune=prune)
    layer = wrappers(model)[1].layer
    with torch.no_grad():  # kept weights that quantize to zero must stay in the mask
        kept = torch.nonzero(layer.weight_mask.reshape(-1)).reshape(-1)[:5]
        layer.weight.view(-1)[kept] = 1e-6
    convert(model, tmp_path / "m.npz")
    for w, la in zip(wrappers(model), load(tmp_path / "m.npz").integer_layers()):
        exact(la.weight_mask, w.layer.weight_mask != 0)
        assert la.w_spec["layout"] in ("bitmask", "relative", "rowcol")
        if not symmetric:  # no free code for a filler marker: a bitmask, or rowcol at a gap width
            assert la.w_spec["layout"] in ("bitmask", "rowcol")  # that needs no filler (mask exact)


def test_layouts_and_payload_follow_the_accounting(tmp_path):
    # unpruned: the payload is what size_bits counts, to the bit, plus byte padding per tensor
    model = prepared(bits_w=4)
    convert(model, tmp_path / "d.npz")
    st = package_stats(tmp_path / "d.npz")
    assert st["accounted_payload_bits"] == size_bits(model)
    n_segments = 4 * 4 + 4 * 2  # per layer: codes, scale, bias, act scale, act zero (4 layers)
    assert 0 <= st["payload_bytes"] * 8 - (size_bits(model) - 4 * 2) < 8 * n_segments  # - format flags
    assert st["file_bytes"] == os.path.getsize(tmp_path / "d.npz")
    assert st["file_bytes"] == st["payload_bytes"] + st["header_bytes"] + st["container_bytes"]
    ops = load_ops(tmp_path / "d.npz")
    codes_seg = [op for op in ops if op["op"] == "Conv1d"][1]["weight"]
    assert codes_seg["layout"] == "dense"
    # 4-bit codes really are packed two per byte
    header, _ = read_package(tmp_path / "d.npz")
    import json

    w2 = [op for op in json.loads(header)["ops"] if op["name"] == "conv2"][0]["weight"]
    assert w2["values"]["dtype"] == "packed" and w2["values"]["nbytes"] == math.ceil(25 * 25 * 3 * 4 / 8)
    # 8-bit symmetric codes are plain int8
    model8 = prepared(bits_w=8)
    convert(model8, tmp_path / "e.npz")
    w8 = [op for op in json.loads(read_package(tmp_path / "e.npz")[0])["ops"] if op["name"] == "conv2"][0][
        "weight"
    ]
    assert w8["values"]["dtype"] == "int8" and w8["values"]["nbytes"] == 25 * 25 * 3
    # pruned: the layout covers the mask, so the payload is at least the accounting's
    pruned = prepared(bits_w=4, prune=0.9)
    convert(pruned, tmp_path / "p.npz")
    st = package_stats(tmp_path / "p.npz")
    assert st["accounted_payload_bits"] >= size_bits(pruned)
    assert st["payload_bytes"] * 8 < size_bits(model) / 2  # sparse layouts pay off


# -- ONNX -----------------------------------------------------------------------------------------
# only the tests that run ONNX are skipped without onnx/onnxruntime (not the whole module)
needs_onnx = pytest.mark.skipif(
    find_spec("onnx") is None or find_spec("onnxruntime") is None, reason="needs onnx and onnxruntime"
)


def _deploy(model, tmp_path, x, y, acc=None):
    from qpexp.deploy import deploy

    dm = SimpleNamespace(splits={"test": (x, y)}, batch_size=100, eval_batch_size=500)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean()) if acc is None else acc
    out = deploy(
        model, dm, tmp_path / "deploy", SimpleNamespace(onnx=True, latency_batches=3), {"final/test_acc": acc}
    )
    return out, acc


@needs_onnx
def test_onnx_qdq_graph_and_integer_kernels(tmp_path):
    import onnx

    from qpexp.deploy import integer_kernels, onnx_model, ort_session

    model = prepared(bits_w=8)
    qm, info = onnx_model(model_ir(model), (40,))
    ops = [n.op_type for n in qm.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 8
    axes = {
        n.input[0]: [a.i for a in n.attribute if a.name == "axis"]
        for n in qm.graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert axes["conv1_wq"] == [0] and axes["fc_wq"] == [1]  # per output channel (MatMul takes W^T)
    inits = {t.name: t for t in qm.graph.initializer}
    # 8-bit codes travel as uint8 (signed ones shifted by 128 with their zero point: u8u8 kernels)
    assert inits["conv2_wq"].data_type == onnx.TensorProto.UINT8
    assert inits["conv2_a_zero"].data_type == onnx.TensorProto.UINT8
    conv2 = dict(quant_layers(model))["conv2"]
    w = conv2.layer.weight.detach().numpy()
    scale = np.abs(w).reshape(len(w), -1).max(1).astype(np.float32) / np.float32(127)  # symmetric per channel
    codes = np.clip(np.rint(w * (np.float32(1) / scale)[:, None, None]), -127, 127)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["conv2_wq"]), codes + 128)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["conv2_w_zero"]), np.full(len(codes), 128))
    assert info["simulated"] == []
    ort_session(qm, 1, tmp_path / "opt.onnx")
    assert integer_kernels(tmp_path / "opt.onnx").count("QLinearConv") == 3  # the convs run on int8


@needs_onnx
def test_onnx_matches_the_fake_quantized_model(tmp_path):
    from qpexp.deploy import onnx_model, ort_session

    model = prepared(bits_w=8)
    x = torch.randn(300, 40)
    qm, _ = onnx_model(model_ir(model), (40,))
    got = ort_session(qm).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    step = max(float(la.aq.scale) for la in wrappers(model))
    assert np.abs(got - ref).max() < 4 * step  # requantization inside QLinearConv: a code at most
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


@needs_onnx
@pytest.mark.parametrize(
    "case, simulated, container",
    [
        ({"bits_w": 8}, False, "uint8"),
        ({"bits_w": 4}, False, "int4"),
        ({"bits_w": 4, "range_": "lsq", "narrow_range": False}, False, "int4"),
        ({"bits_w": 8, "range_": "lsq", "narrow_range": False}, False, "uint8"),
        ({"bits_w": 3}, True, "int4"),
        ({"bits_w": 6, "symmetric": False}, True, "uint8"),
        ({"bits_w": 4, "bits_a": 4, "symmetric": False}, False, "uint4"),
        ({"bits_w": 4, "scheme": "log"}, True, None),
    ],
)
def test_deploy_marks_simulated_widths(tmp_path, case, simulated, container):
    model = prepared(**case)
    x, y = torch.randn(200, 40), torch.randint(0, 10, (200,))
    out, acc = _deploy(model, tmp_path, x, y)
    assert out["deploy/simulated_only"] is simulated
    assert out["deploy/roundtrip_max_abs_diff"] == 0.0 and out["deploy/roundtrip_codes_equal"] is True
    assert out["deploy/file_bytes"] == os.path.getsize(out["deploy/path"])
    if container is None:
        assert "deploy/onnx_test_acc" not in out and "log" in out["deploy/simulated_reason"]
    else:
        assert out["deploy/onnx_weight_container"] == container
        assert out["deploy/onnx_argmax_agree"] >= 0.97
        assert out["deploy/onnx_latency_ms"] > 0 and out["deploy/fp32_onnx_latency_ms"] > 0
        if simulated:
            assert f"{case['bits_w']}-bit weights run in {container}" in out["deploy/simulated_reason"]


# -- end to end: PTQ and QAT through the pipeline --------------------------------------------------
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from conftest import compose

    from qpexp.pipeline import Pipeline

    root = tmp_path_factory.mktemp("e2e")
    common = [
        "logger=none",
        "prune.ratio=0",
        "baseline.epochs=12",
        "quant.bits_w=8",
        "quant.calib_batches=4",
        "export.latency_batches=5",
        f"cache_dir={root / 'cache'}",
    ]
    out = {}
    for mode, epochs in (("ptq", 0), ("qat", 1)):
        cfg = compose([*common, f"quant.epochs={epochs}"])
        out[mode] = Pipeline(cfg, root / mode).run()
    return out


@needs_onnx
@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_end_to_end_quant_mode_and_deploy(e2e, mode):
    rec = e2e[mode]
    assert rec["status"] == "ok"
    assert rec["final/quant_mode"] == mode
    assert rec["deploy/roundtrip_max_abs_diff"] == 0.0
    assert rec["deploy/roundtrip_codes_equal"] is True
    assert rec["deploy/simulated_only"] is False
    assert rec["deploy/file_bytes"] == os.path.getsize(rec["deploy/path"])
    assert rec["deploy/onnx_integer_kernels"] >= 3
    # the ONNX model in onnxruntime matches the fake-quantized accuracy within 0.2 points
    assert abs(rec["deploy/onnx_test_acc"] - rec["final/test_acc"]) <= 0.002 + 1e-9
    assert rec["final/test_acc"] > 0.5  # a trained model, so the comparison means something


def _latent(rec: dict, stage: str) -> dict[str, torch.Tensor]:
    """A stage's saved float weights and biases (saved in the cache entry), keyed by layer."""
    from qpexp.io import safe_torch_load

    state = safe_torch_load(Path(rec[f"artifacts/{stage}"]) / "model.pt")["model"]
    return {k.replace(".layer.", "."): v for k, v in state.items() if k.endswith((".weight", ".bias"))}


def test_ptq_changes_no_weight_qat_does(e2e):
    """PTQ only calibrates: the latent weights are bit for bit the input model's (the baseline's, as
    the prune stage is off); one QAT epoch moves them."""
    names = {f"{layer}.{p}" for layer in ("conv1", "conv2", "conv3", "fc") for p in ("weight", "bias")}
    for mode in ("ptq", "qat"):
        before, after = _latent(e2e[mode], "baseline"), _latent(e2e[mode], "qat")
        assert set(before) == set(after) == names
        changed = [k for k in names if not torch.equal(before[k], after[k])]
        if mode == "ptq":
            assert changed == [], changed
        else:  # Adam moves every tensor that gets a gradient
            assert sorted(changed) == sorted(names)
    assert e2e["ptq"]["qat/best_epoch"] == -1
    assert e2e["qat"]["qat/best_epoch"] == 0


def test_payload_bytes_against_a_hand_count_of_the_file(tmp_path):
    """Issue 20: ``deploy/payload_bytes`` recounted independently. An MLP 40-16-3 with 4-bit
    symmetric per-channel weights and 8-bit asymmetric per-tensor activations stores, per layer,
    its codes bit-packed (4 bits each, byte-aligned), one float32 scale per output channel (no zero
    point: symmetric), a float32 bias per output, and its input quantizer's float32 scale and int32
    zero point: 320 + 64 + 64 + 8 for the first layer, 24 + 12 + 12 + 8 for the second."""
    model = prepared(nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)), bits_w=4)
    convert(model, tmp_path / "m.npz")
    first = math.ceil(40 * 16 * 4 / 8) + 16 * 4 + 16 * 4 + 4 + 4
    second = math.ceil(16 * 3 * 4 / 8) + 3 * 4 + 3 * 4 + 4 + 4
    assert (first, second) == (456, 56)
    layouts = [la.w_spec["layout"] for la in load(tmp_path / "m.npz").integer_layers()]
    assert layouts == ["dense", "dense"]  # random weights: few zero codes, the dense layout is cheapest
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:  # the file itself: its byte blob
        assert sorted(z.files) == ["blob", "header"] and z["blob"].dtype == np.uint8
        stored = z["blob"].nbytes
    assert stored == first + second
    assert package_stats(tmp_path / "m.npz")["payload_bytes"] == first + second
