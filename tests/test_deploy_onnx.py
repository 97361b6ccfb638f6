"""The ONNX QDQ model, run by onnxruntime with fused integer kernels, computes the textbook integer
pipeline: codes ``q = clamp(rint(x / S) + Z)``, int32 accumulation of ``(q_x - Z_x)(q_w - Z_w)``, the
bias rounded to int32 at scale ``S_x S_w``, requantization ``rint(acc S_x S_w / S_y) + Z_y``. The
reference below is that pipeline written out in numpy, independent of qpexp's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.quant import QuantConfig, QuantSpec, quant_layers, quantize_
from qpexp.core.quant.export import model_ir

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _extreme_conv_model(bits_w: int):
    """Conv1d -> ReLU -> Linear whose weight codes sit at +-(2^(b-1)-1) and whose input codes sit near
    255: on CPUs without VNNI, u8 x s8 pair sums (255 * 127 * 2) overflow int16."""
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 8, 3)
    with torch.no_grad():
        conv.weight.copy_(
            torch.sign(torch.randn_like(conv.weight)) * (0.5 + 0.5 * torch.rand_like(conv.weight))
        )
        conv.weight[:, :, 0] = conv.weight[:, :, 0].abs()  # many same-sign pairs
        conv.weight[:, :, 1] = conv.weight[:, :, 1].abs()
        conv.bias.uniform_(-1, 1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10, 5))
    spec_w = QuantSpec(bits=bits_w, granularity="channel", symmetric=True)
    quantize_(model, QuantConfig(weight=spec_w, act=QuantSpec(bits=8, symmetric=False)))
    x = 3 * torch.rand(256, 16, 12)
    model.train()
    model(x)  # calibrate
    return model.eval(), x


@pytest.mark.parametrize("bits_w", [8, 7])
def test_fused_integer_conv_computes_the_integer_reference(tmp_path, bits_w):
    from qpexp.deploy import integer_kernels, onnx_model, ort_session

    model, x = _extreme_conv_model(bits_w)
    layers = dict(quant_layers(model))
    conv, fc = layers["0"], layers["3"]
    sx, zx = float(conv.aq.scale), int(conv.aq.zero_point)
    sy, zy = float(fc.aq.scale), int(fc.aq.zero_point)
    # inputs a quarter step away from rounding edges, codes mostly near the top of [0, 255]
    codes_x = torch.randint(200, 256, x.shape).clamp(max=255)
    x = ((codes_x - zx).float() + 0.25) * sx

    qm, info = onnx_model(model_ir(model), tuple(x.shape[1:]))
    q_out = [n.output[0] for n in qm.graph.node if n.op_type == "QuantizeLinear"][1]  # fc's input codes
    qm.graph.output.append(onnx.helper.make_tensor_value_info(q_out, onnx.TensorProto.UINT8, None))
    sess = ort_session(qm, 1, tmp_path / "opt.onnx")
    assert "QLinearConv" in integer_kernels(tmp_path / "opt.onnx")  # really the fused integer kernel
    got = sess.run([q_out], {"input": x.numpy()})[0].astype(np.int64)

    # the reference, in numpy
    qmax = 2 ** (bits_w - 1) - 1
    w = conv.layer.weight.detach().numpy().astype(np.float32)
    sw = (np.abs(w).reshape(len(w), -1).max(1) / np.float32(qmax)).astype(np.float32)
    wq = np.clip(np.rint(w / sw[:, None, None]), -qmax, qmax).astype(np.int64)
    xq = np.clip(np.rint(x.numpy() / np.float32(sx)) + zx, 0, 255).astype(np.int64)
    assert (xq == codes_x.numpy()).all()
    k = w.shape[2]
    cols = np.stack([xq[:, :, i : i + x.shape[2] - k + 1] for i in range(k)], axis=2) - zx  # N, C, K, L
    acc = np.einsum("nckl,ock->nol", cols, wq)
    bias_scale = (np.float32(sx) * sw).astype(np.float32)
    bq = np.rint(conv.layer.bias.detach().numpy() / bias_scale).astype(np.int64)
    mult = (bias_scale / np.float32(sy)).astype(np.float32)
    want = np.clip(np.rint((acc + bq[None, :, None]).astype(np.float32) * mult[None, :, None]) + zy, zy, 255)
    # (ReLU is the clamp at Z_y; the Q sits before Flatten, which commutes with quantization)

    assert np.abs(got - want).max() <= 1  # a code on a float rounding edge may differ by one
    assert (got == want).mean() >= 0.999


def test_deploy_agrees_with_the_fake_quantized_model_at_8_bits(tmp_path):
    from types import SimpleNamespace

    from qpexp.deploy import deploy

    model, x = _extreme_conv_model(8)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)  # labels the fake-quantized model gets right: its accuracy is 1
    dm = SimpleNamespace(splits={"test": (x, y)}, batch_size=64, eval_batch_size=256)
    cfg = SimpleNamespace(onnx=True, latency_batches=2)
    out = deploy(model, dm, tmp_path / "deploy", cfg, {"final/test_acc": 1.0})
    assert out["deploy/onnx_integer_kernels"] >= 1 and out["deploy/onnx_bias_int32"] is True
    assert out["deploy/onnx_argmax_agree"] >= 0.998
    assert abs(out["deploy/onnx_acc_diff"]) <= 0.002


# -- the one rule for int32 biases (issue 22: the per-layer and graph checks used to disagree) ----
def _ort_kernels(qdq_path, tmp_path, disabled):
    """Integer kernels in onnxruntime's optimized graph, straight from onnxruntime and onnx."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"ref{len(disabled)}.onnx")
    ort.InferenceSession(str(qdq_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    integer = ("QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat")
    return [o for o in ops if o.startswith("QLinear") or o in integer]


@pytest.mark.parametrize("bias", [True, False])
def test_int32_biases_are_kept_only_where_they_fuse_more_integer_kernels(tmp_path, bias):
    """Without biases, onnxruntime fuses the same QLinearConv either way: nothing is rounded to
    int32, and the record must say so (the old per-layer rule said int32 whenever any integer kernel
    ran). With float biases, their int32 rounding is what lets QLinearConv fuse: kept."""
    from types import SimpleNamespace

    from qpexp.deploy import deploy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, bias=bias), nn.ReLU(), nn.Conv1d(8, 8, 3, bias=bias), nn.ReLU())
    model.append(nn.Flatten())
    model.append(nn.Linear(8 * 8, 5, bias=bias))
    spec = QuantSpec(bits=8, granularity="channel", symmetric=True)
    quantize_(model, QuantConfig(weight=spec, act=QuantSpec(bits=8, symmetric=False)))
    x = torch.randn(128, 4, 12)
    model.train()
    model(x)  # calibrate
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    dm = SimpleNamespace(splits={"test": (x, y)}, batch_size=64, eval_batch_size=128)
    out = deploy(
        model, dm, tmp_path / "d", SimpleNamespace(onnx=True, latency_batches=1), {"final/test_acc": 1.0}
    )
    qdq = tmp_path / "d" / "model.qdq.onnx"
    with_wbq = _ort_kernels(qdq, tmp_path, [])
    without = _ort_kernels(qdq, tmp_path, ["WeightBiasQuantization"])
    assert with_wbq, "onnxruntime fused no integer kernel: the case tests nothing"
    has_float_bias = any(t.name.endswith("_b") for t in onnx.load(str(qdq)).graph.initializer)
    assert has_float_bias is bias
    assert out["deploy/onnx_bias_int32"] is (len(with_wbq) > len(without))
    assert out["deploy/onnx_bias_int32"] is bias  # no bias: nothing could have been rounded
    assert out["deploy/onnx_integer_kernels"] == len(with_wbq if bias else without)


# -- the point's status ----------------------------------------------------------------------------
def _pipeline(tmp_path, overrides):
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline

    cfg = compose(
        [*TINY, f"cache_dir={tmp_path.parent / 'cache'}", "prune.ratio=0", "quant.bits_w=8", *overrides]
    )
    return Pipeline(cfg, tmp_path / "run").run()


def test_deploy_problems_set_the_status_and_keep_the_accuracy(tmp_path, monkeypatch):
    import csv

    import qpexp.deploy
    from qpexp.cli import summary_table
    from qpexp.frontier import collect, write_csv
    from qpexp.pipeline import write_record

    good = _pipeline(tmp_path / "a", ["quant.epochs=0", "export.latency_batches=1"])
    assert good["status"] == "ok", good.get("status_reason")
    # 8-bit PTQ deploys faithfully: onnxruntime's accuracy within 0.2 points of the fake-quantized model
    assert abs(good["deploy/onnx_test_acc"] - good["final/test_acc"]) <= 0.002
    assert good["deploy/onnx_integer_kernels"] >= 1

    real = qpexp.deploy._onnx_check

    def off_by_five_points(*a, **k):
        out = real(*a, **k)
        return {**out, "deploy/onnx_test_acc": out["deploy/onnx_test_acc"] - 0.05}

    monkeypatch.setattr(qpexp.deploy, "_onnx_check", off_by_five_points)
    bad = _pipeline(tmp_path / "b", ["quant.epochs=0", "export.latency_batches=1"])
    assert bad["status"] == "deploy_mismatch" and "0.002" in bad["status_reason"]
    assert bad["final/test_acc"] == good["final/test_acc"]  # the accuracy is kept (same seed, same model)
    assert "status: deploy_mismatch" in summary_table(bad)

    def broken(*a, **k):
        raise RuntimeError("runtime exploded")

    monkeypatch.setattr(qpexp.deploy, "_onnx_check", broken)
    err = _pipeline(tmp_path / "c", ["quant.epochs=0", "export.latency_batches=1"])
    assert err["status"] == "deploy_error" and "runtime exploded" in err["deploy/error"]
    assert "status: deploy_error" in summary_table(err)

    for name, rec in (("a", good), ("b", bad), ("c", err)):
        write_record(tmp_path / name / "run", {**rec, "config": {}})
    rows, axes = collect([tmp_path / n / "run" for n in "abc"])
    write_csv(rows, axes, tmp_path / "frontier.csv")
    with open(tmp_path / "frontier.csv", newline="") as f:
        table = [r for r in csv.DictReader(f) if r["point"] == "run"]
    assert sorted(r["status"] for r in table) == ["deploy_error", "deploy_mismatch", "ok"]
    assert all(float(r["final/test_acc"]) == good["final/test_acc"] for r in table)  # accuracy kept


def test_deploy_status_looks_at_every_check_that_ran():
    """Issue 20: ``ok`` only when a check ran and passed; the integer file's accuracy and its codes
    count as much as onnxruntime's; nothing deployed is ``not_deployed``, not ``ok``."""
    from qpexp.deploy import deploy_checks, deploy_status

    passed_int = {"deploy/int_test_acc": 0.900, "deploy/roundtrip_codes_equal": True}
    passed_both = {**passed_int, "deploy/onnx_test_acc": 0.901}
    assert deploy_checks({}) == "none" and deploy_status({}, 0.9) == (
        "not_deployed",
        "no deployment check ran",
    )
    assert deploy_checks(passed_int) == "int" and deploy_status(passed_int, 0.9) == ("ok", None)
    assert deploy_checks(passed_both) == "int+onnx" and deploy_status(passed_both, 0.9) == ("ok", None)
    # the integer file 0.3 points off (ONNX fine): a mismatch, named as the file's
    status, why = deploy_status({**passed_both, "deploy/int_test_acc": 0.897}, 0.9)
    assert status == "deploy_mismatch" and why.startswith("integer file test accuracy 0.8970")
    status, why = deploy_status({**passed_both, "deploy/onnx_test_acc": 0.897}, 0.9)
    assert status == "deploy_mismatch" and why.startswith("onnxruntime test accuracy 0.8970")
    status, why = deploy_status({**passed_both, "deploy/roundtrip_codes_equal": False}, 0.9)
    assert status == "deploy_mismatch" and "codes" in why
    assert deploy_status({**passed_both, "deploy/error": "ONNX: boom"}, 0.9) == ("deploy_error", "ONNX: boom")


@pytest.mark.parametrize(
    "overrides,checks,status",
    [
        (["export.enabled=false"], "none", "not_deployed"),
        (["quant.bits_w=32"], "none", "not_deployed"),
        (["export.onnx=false"], "int", "ok"),
    ],
)
def test_record_says_which_deployment_check_ran(tmp_path, overrides, checks, status):
    rec = _pipeline(tmp_path, ["quant.epochs=0", *overrides])
    assert rec["deploy/checks"] == checks and rec["status"] == status, rec.get("status_reason")
    if status == "not_deployed":
        assert "deploy/int_test_acc" not in rec and rec["status_reason"].startswith("not deployed: ")
    else:
        assert rec["deploy/simulated_only"] is True and "deploy/onnx_test_acc" not in rec
        assert abs(rec["deploy/int_test_acc"] - rec["final/test_acc"]) <= 0.002


def test_clear_argmax_agreement_by_hand():
    """Samples 0 and 2 have a clear argmax (leads by 2 of a range of 3, and by 5 of 5); sample 1's
    lead (0.05 of 1) is under a tenth of its range. ``got`` disagrees on sample 0, agrees on 2."""
    from qpexp.deploy.common import clear_agreement

    ref = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.95, 0.0], [0.0, 0.0, 5.0]])
    got = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    frac, agree = clear_agreement(got, ref)
    assert frac == pytest.approx(2 / 3) and agree == 0.5
