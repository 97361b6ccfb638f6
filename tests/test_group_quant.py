"""Per-group weight scales (``quant.granularity=group``): fake quantization against a loop over rows
and groups written here, a hand-computed example, the size count by hand, GPTQ onto group grids,
the integer file (and hostile variants of it), ONNX in onnxruntime, the pipeline, config errors."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.accounting import size_bits
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.gptq import gptq_
from qpexp.core.quant.linear import LinearQuantizer
from qpexp.core.quant.package import read_package


def group_quantizer(bits, gs, symmetric, channels, row_size, ch_axis=0):
    spec = QuantSpec(bits=bits, granularity="group", group_size=gs, symmetric=symmetric)
    return LinearQuantizer(spec, True, channels=channels, ch_axis=ch_axis, row_size=row_size)


def loop_reference(w: np.ndarray, bits: int, gs: int, symmetric: bool):
    """Fake quantization of a ``(C, K)`` float32 weight, row by row and group by group, in numpy
    (the fake-quantize kernel's formula: ``q = clamp(rint(x * (1/S)) + Z)``, ``x_hat = (q - Z) S``).
    Returns (x_hat, codes, scales, zero points), the last two as ``C * G`` flat lists."""
    f = np.float32
    tiny = f(np.finfo(np.float32).tiny * 2**24)
    out, codes = np.zeros_like(w), np.zeros(w.shape, np.int64)
    scales, zeros = [], []
    for c in range(w.shape[0]):
        for start in range(0, w.shape[1], gs):
            v = w[c, start : start + gs]
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
                s = max(f(np.abs(v).max() / f(qmax)), tiny)
                z = 0
            else:
                qmin, qmax = 0, 2**bits - 1
                lo, hi = min(f(v.min()), f(0)), max(f(v.max()), f(0))
                s = max(f(f(hi - lo) / f(qmax - qmin)), tiny)
                z = int(np.clip(qmin - np.rint(f(lo / s)), qmin, qmax))
            q = np.clip(np.rint(v * f(f(1) / s)) + z, qmin, qmax)
            codes[c, start : start + gs] = q
            out[c, start : start + gs] = ((q - z) * s).astype(np.float32)
            scales.append(s)
            zeros.append(z)
    return out, codes, np.array(scales, np.float32), np.array(zeros)


# -- fake quantization ------------------------------------------------------------------------------
def test_hand_example_2x6_group_4_symmetric():
    # 4-bit narrow symmetric (qmax 7); groups: columns 0-3 and the short 4-5; scales max|w| / 7
    w = torch.tensor([[1.75, -0.3, 0.6, 0.1, -3.5, 1.0], [0.875, -0.2, 0.3, 0.05, 0.1, -0.4375]])
    q = group_quantizer(4, 4, True, 2, 6)
    want = [[1.75, -0.25, 0.5, 0.0, -3.5, 1.0], [0.875, -0.25, 0.25, 0.0, 0.125, -0.4375]]
    assert q(w).tolist() == want
    scale, zero = q.qparams(w)
    assert scale.tolist() == [0.25, 0.5, 0.125, 0.0625] and zero.tolist() == [0, 0, 0, 0]
    assert q.int_repr(w).tolist() == [[7, -1, 2, 0, -7, 2], [7, -2, 2, 0, 2, -7]]
    assert q.n_qparams() == (4, 0)
    # per channel the first row has one scale 3.5 / 7 = 0.5: 1.75 -> 2.0 (round half to even)
    per_ch = LinearQuantizer(QuantSpec(bits=4, granularity="channel", symmetric=True), True, channels=2)
    assert per_ch(w)[0, 0] == 2.0


def test_hand_example_2x6_group_4_asymmetric():
    # 4-bit asymmetric [0, 15]: S = (max(hi, 0) - min(lo, 0)) / 15, Z = -round(lo / S)
    w = torch.tensor([[-0.625, 1.25, 0.3, 0.0, 3.75, 0.3], [-1.875, -0.3, -1.0, -0.1, -0.25, 3.5]])
    q = group_quantizer(4, 4, False, 2, 6)
    want = [[-0.625, 1.25, 0.25, 0.0, 3.75, 0.25], [-1.875, -0.25, -1.0, -0.125, -0.25, 3.5]]
    assert q(w).tolist() == want
    scale, zero = q.qparams(w)
    assert scale.tolist() == [0.125, 0.25, 0.125, 0.25] and zero.tolist() == [5, 0, 15, 1]
    assert q.int_repr(w).tolist() == [[0, 15, 7, 5, 15, 1], [0, 13, 7, 14, 0, 15]]
    assert q.n_qparams() == (4, 4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits, gs", [(4, 8), (3, 5), (8, 16)])
def test_fake_quant_equals_the_loop_over_rows_and_groups(symmetric, bits, gs):
    """A conv weight (6, 3, 3, 3): K = 27 is no multiple of the group size (a short last group)."""
    torch.manual_seed(bits + gs)
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1) * 3
    q = group_quantizer(bits, gs, symmetric, 6, 27)
    want, codes, scales, zeros = loop_reference(w.reshape(6, 27).numpy(), bits, gs, symmetric)
    np.testing.assert_array_equal(q(w).reshape(6, 27).numpy(), want)
    np.testing.assert_array_equal(q.int_repr(w).reshape(6, 27).numpy(), codes)
    s, z = q.qparams(w)
    np.testing.assert_array_equal(s.numpy(), scales)
    np.testing.assert_array_equal(z.numpy(), zeros)
    assert q.n_qparams() == (6 * math.ceil(27 / gs), 0 if symmetric else 6 * math.ceil(27 / gs))
    # straight-through gradient: 1 where nothing is clamped (min/max ranges clamp nothing)
    wr = w.clone().requires_grad_()
    q(wr).sum().backward()
    assert torch.equal(wr.grad, torch.ones_like(w))


def test_channel_axis_last_groups_along_the_other_dimension():
    """A raw ``x @ W`` weight (K, N) has its channels last: groups run down each column."""
    torch.manual_seed(1)
    w = torch.randn(10, 4)
    q = group_quantizer(4, 4, False, 4, 10, ch_axis=1)
    want, codes, _, _ = loop_reference(w.T.contiguous().numpy(), 4, 4, False)
    np.testing.assert_array_equal(q(w).T.numpy(), want)
    np.testing.assert_array_equal(q.int_repr(w).T.numpy(), codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gs", [27, 64])
def test_group_size_at_least_k_is_per_channel(symmetric, gs):
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 3)
    per_ch = LinearQuantizer(QuantSpec(bits=4, granularity="channel", symmetric=symmetric), True, channels=5)
    q = group_quantizer(4, gs, symmetric, 5, 27)
    assert torch.equal(q(w), per_ch(w))
    codes = q.int_repr(w)
    assert torch.equal(codes, per_ch.int_repr(w))
    assert torch.equal(q.qparams(w)[0], per_ch.qparams(w)[0])
    assert q.qmin <= int(codes.min()) and int(codes.max()) <= q.qmax  # on the integer grid
    s, z = q.qparams(w)
    expect = (codes.reshape(5, -1).float() - z.reshape(5, 1).float()) * s.reshape(5, 1)
    assert torch.equal(q(w).reshape(5, -1), expect)


# -- size accounting --------------------------------------------------------------------------------
def test_size_bits_counts_every_group_scale_by_hand():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5))
    for m in (model[0], model[3]):  # no zero codes: the dense layout is the cheapest
        with torch.no_grad():
            m.weight.copy_(torch.sign(torch.randn_like(m.weight)) * (0.5 + torch.rand_like(m.weight)))
    w = QuantSpec(bits=4, granularity="group", group_size=4, symmetric=False)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=32)))
    total, rows, _ = size_bits(model, detail=True)
    # conv: 4 x 9 codes, K = 9 -> 3 groups per row; linear: 5 x 24 codes, K = 24 -> 6 groups per row
    conv = 36 * 4 + 2 + (4 * 3) * (32 + 32) + 4 * 32  # codes + flag, scales and zero points, bias
    fc = 120 * 4 + 2 + (5 * 6) * (32 + 32) + 5 * 32
    assert rows["0"]["format"] == rows["3"]["format"] == "dense"
    assert rows["0"]["qparam_bits"] == 12 * 64 and rows["3"]["qparam_bits"] == 30 * 64
    assert total == conv + fc
    sym = nn.Sequential(nn.Linear(24, 5))
    quantize_(
        sym,
        QuantConfig(
            weight=QuantSpec(bits=4, granularity="group", group_size=5, symmetric=True),
            act=QuantSpec(bits=32),
        ),
    )
    assert size_bits(sym, detail=True)[1]["0"]["qparam_bits"] == 5 * 5 * 32  # no zero points


def test_huffman_size_counts_the_group_scales():
    from qpexp.core.huffman import size_bits_huffman

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(24, 5))
    quantize_(
        model,
        QuantConfig(
            weight=QuantSpec(bits=4, granularity="group", group_size=8, symmetric=True),
            act=QuantSpec(bits=32),
        ),
    )
    plain = size_bits(model, detail=True)[1]["0"]
    huff = size_bits_huffman(model, detail=True)[1]["0"]
    # the Huffman total replaces the weight payload only: scales (5 x 3) and bias stay as counted
    assert size_bits_huffman(model) == huff["bits"] + plain["qparam_bits"] + plain["bias_bits"]
    assert plain["qparam_bits"] == 15 * 32


# -- GPTQ -------------------------------------------------------------------------------------------
def correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, generator=g)
    mix = torch.randn(3, d, generator=g)
    return base @ mix + 0.3 * torch.randn(n, d, generator=g)


def one_linear(d_in, d_out, gran, symmetric, gs=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    w = QuantSpec(bits=3, granularity=gran, symmetric=symmetric, group_size=gs)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=32)))
    return model


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groups_beat_nearest_and_codes_lie_on_each_groups_grid(symmetric, act_order):
    model = one_linear(20, 6, "group", symmetric)  # K = 20: groups of 8, 8, 4
    q = model[0]
    w = q.layer.weight.detach().clone()
    x = correlated(512, 20, 6)
    nearest = q.wq(w).detach()
    out = gptq_(model, [x[:256], x[256:]], act_order=act_order)
    rec = out["layers"]["0"]
    assert rec["mse_gptq"] <= rec["mse_nearest"] and not rec["kept_nearest"] and rec["groups"] == 18
    new = q.layer.weight.detach()
    fq = q.wq(new).detach()
    ref = x @ w.T
    assert float((x @ fq.T - ref).pow(2).mean()) < float((x @ nearest.T - ref).pow(2).mean())
    # each group's grid, recomputed here from the written weight: every weight sits on it
    for r in range(6):
        for start in range(0, 20, 8):
            v = new[r, start : start + 8].double()
            if symmetric:
                s = float(np.float32(float(v.abs().max()) / 3))
                c = torch.round(v / s)
                assert c.abs().max() <= 3
            else:
                lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                s = float(np.float32(np.float32(hi - lo) / 7))
                z = -round(lo / s)
                c = torch.round(v / s) + z
                assert 0 <= c.min() and c.max() <= 7
                c = c - z
            torch.testing.assert_close(fq[r, start : start + 8].double(), c * s, rtol=1e-6, atol=1e-7)
    if not act_order:  # dynamic groups: later groups' scales come from the updated weights
        assert not torch.equal(q.wq.qparams(new)[0], q.wq.qparams(w)[0])
    else:  # static groups: every scale is the float weight's
        assert torch.equal(q.wq.qparams(new)[0], q.wq.qparams(w)[0])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_group_size_k_matches_per_channel_gptq(symmetric, act_order):
    x = correlated(512, 20, 7)
    a, b = one_linear(20, 6, "channel", symmetric), one_linear(20, 6, "group", symmetric, gs=20)
    gptq_(a, [x[:256], x[256:]], act_order=act_order)
    gptq_(b, [x[:256], x[256:]], act_order=act_order)
    assert torch.equal(a[0].layer.weight, b[0].layer.weight)


def test_gptq_groups_keep_pruned_weights_zero():
    from qpexp.core.prune import set_mask

    model = one_linear(16, 4, "group", False, gs=6)
    lin = model[0].layer
    mask = (torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    set_mask(lin, mask)
    gptq_(model, [correlated(256, 16, 8)])
    assert torch.all(lin.weight[mask == 0] == 0)
    codes = model[0].wq.int_repr(lin.weight)
    _, z = model[0].wq.qparams(lin.weight)
    zero_code = z.reshape(4, 3).repeat_interleave(6, 1)[:, :16]
    assert torch.equal(codes[mask == 0], zero_code[mask == 0])


# -- the integer file, hostile variants, ONNX -------------------------------------------------------
def _group_model(symmetric, bits=4):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10, 5))
    w = QuantSpec(bits=bits, granularity="group", group_size=4, symmetric=symmetric)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=8)))
    x = torch.randn(64, 3, 12)
    model.train()
    model(x)
    return model.eval(), x


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("symmetric, bits", [(True, 4), (False, 4), (False, 8)])
def test_file_round_trip_and_onnx(tmp_path, graph, symmetric, bits):
    pytest.importorskip("onnxruntime")
    from qpexp.core.quant.export import convert, load, load_ops
    from qpexp.deploy import onnx_model, ort_session
    from qpexp.deploy.emit import onnx_graph_model

    model, x = _group_model(symmetric, bits)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "m.npz"
    convert(model, path, graph=graph)
    for arithmetic in ("float", "integer"):  # per-group layers dequantize in either: bit for bit
        with torch.no_grad():
            assert torch.equal(load(path, arithmetic)(x), ref)
    header = json.loads(read_package(path)[0])
    entries = header.get("ops") or header.get("nodes")
    weights = [e["weight"] for e in entries if e.get("weight") and e["weight"]["scheme"] == "linear"]
    assert len(weights) == 2 and all(w["group_size"] == 4 for w in weights)
    assert sorted(w["scale"]["shape"] for w in weights) == [[6 * 3], [5 * 15]]
    if graph:
        qm, _ = onnx_graph_model(load(path, "float"), x[:2])
    else:
        qm, _ = onnx_model(load_ops(path), (3, 12))
    assert "DequantizeLinear" in {n.op_type for n in qm.graph.node}
    got = ort_session(qm, 1, tmp_path / "o.onnx").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


class _RawMatmul(nn.Module):
    """``relu(x @ W)`` with a raw ``W`` (K, N): channels last, quantized in the graph."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(10, 7))
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc(torch.relu(x @ self.W))


def test_raw_weight_with_channels_last_round_trips_and_runs_in_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from qpexp.core.quant.export import convert, load
    from qpexp.deploy import ort_session
    from qpexp.deploy.emit import onnx_graph_model

    torch.manual_seed(6)
    model, x = _RawMatmul(), torch.randn(32, 10)
    w = QuantSpec(bits=4, granularity="group", group_size=4, symmetric=False)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=8)), example=x[:2])
    assert model.W_wq.ch_axis == 1 and model.W_wq.n_qparams() == (7 * 3, 7 * 3)  # K = 10: 3 groups
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    convert(model, tmp_path / "m.npz", graph=True)
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.npz", "integer")(x), ref)
    qm, _ = onnx_graph_model(load(tmp_path / "m.npz", "float"), x[:2])
    assert "Transpose" in {n.op_type for n in qm.graph.node}
    got = ort_session(qm, 1, tmp_path / "o.onnx").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def _rewrite(path, out, edit):
    """The file at ``path`` with its JSON header edited by ``edit(entries)``, written to ``out``."""
    header, blob = read_package(path)
    meta = json.loads(header)
    edit(meta.get("ops") or meta.get("nodes"))
    head = np.frombuffer(zlib.compress(json.dumps(meta).encode()), np.uint8)
    with open(out, "wb") as f:
        np.savez(f, header=head, blob=blob)
    return out


@pytest.mark.parametrize("graph, layer", [(False, "'0'"), (True, "'0.layer.weight'")])
@pytest.mark.parametrize(
    "change, needle",
    [
        ("group_size", "needs 30 values"),  # group_size 2: 6 x 5 groups, not the 6 x 3 stored
        ("scale_shape", "weight scale has shape [17]"),
        ("zero_shape", "weight zero_point has shape [17]"),
        ("bad_group", "group_size=0"),
    ],
)
def test_group_scales_of_the_wrong_shape_are_refused(tmp_path, graph, layer, change, needle):
    from qpexp.core.quant.export import convert, load

    model, _ = _group_model(False)
    convert(model, tmp_path / "m.npz", graph=graph)

    def edit(entries):
        e = next(e for e in entries if e.get("weight") and e["weight"].get("group_size"))
        w = e["weight"]
        if change == "group_size":
            w["group_size"] = 2
        elif change == "bad_group":
            w["group_size"] = 0
        else:
            seg = w["scale" if change == "scale_shape" else "zero_point"]
            seg["shape"], seg["nbytes"] = [17], 17 * 4

    path = _rewrite(tmp_path / "m.npz", tmp_path / "bad.npz", edit)
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert needle in msg and f"layer {layer}" in msg, msg


# -- through the pipeline, and config errors ---------------------------------------------------------
def test_pipeline_gptq_groups_end_to_end(tmp_path):
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline

    over = ["prune.finetune_epochs=0", "prune.schedule=oneshot", "prune.calib_batches=2"]
    over += ["prune.criterion=wanda", "prune.scope=layer", "quant.epochs=0", "quant.rounding=gptq"]
    over += ["quant.granularity=group", "quant.group_size=8", "quant.symmetric=false", "export.enabled=true"]
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'c'}", *over])
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["status"] == "ok", rec.get("status_reason")
    assert rec["quant/rounding"] == "gptq" and 0 < rec["quant/rounding_changed"] < 1
    # the integer file read back code for code, and onnxruntime agreeing with torch, both checked
    assert rec["deploy/checks"] == "int+onnx" and rec["deploy/roundtrip_codes_equal"] is True
    assert rec["deploy/onnx_argmax_agree"] == 1.0
    assert rec["deploy/accounted_payload_bits"] == rec["final/size_bits"]  # the group scales counted
    header = json.loads(read_package(rec["deploy/path"])[0])
    entries = header.get("ops") or header.get("nodes")
    weights = [e["weight"] for e in entries if e.get("weight") and e["weight"]["scheme"] == "linear"]
    assert weights and all(w["group_size"] == 8 and w["zero_point"] for w in weights)


def test_pipeline_qat_with_groups(tmp_path):
    """One QAT epoch on per-group fake-quantized weights (nearest rounding), exported and checked."""
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline

    over = ["prune.ratio=0", "quant.granularity=group", "quant.group_size=16", "export.enabled=true"]
    rec = Pipeline(compose([*TINY, f"cache_dir={tmp_path / 'c'}", *over]), tmp_path / "run").run()
    assert rec["status"] == "ok", rec.get("status_reason")
    assert rec["final/quant_mode"] == "qat" and rec["deploy/roundtrip_codes_equal"] is True
    assert rec["deploy/accounted_payload_bits"] == rec["final/size_bits"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["quant.act.granularity=group"], "quant.act.granularity"),
        (["quant.granularity=group", "quant.group_size=0"], "quant.group_size"),
        (["quant.granularity=group", "quant.group_size=-4"], "quant.group_size"),
        (["quant.granularity=group", "quant.range=lsq"], "quant.range"),
        (["quant.granularity=group", "quant.scheme=log"], "quant.granularity"),
        (["quant=codebook", "quant.granularity=group"], "quant.granularity"),
        (["quant.granularity=group", "quant.rounding=adaround"], "quant.granularity"),
        (["quant.granularity=block"], "quant.granularity"),
    ],
)
def test_bad_group_config_refused(tmp_path, overrides, key):
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline
    from qpexp.schema import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        Pipeline(compose([*TINY, f"cache_dir={tmp_path}", *overrides]), tmp_path / "run")
    assert str(e.value).count("\n") == 0  # one error, one line
    assert not any(tmp_path.iterdir())
