"""Issue 11: AdaRound post-training rounding (quant.rounding=adaround)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose
from torch import nn

from qpexp.core.prune import set_mask
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.adaround import adaround_
from qpexp.pipeline import Pipeline
from qpexp.schema import ConfigError


def one_linear(granularity: str, symmetric: bool, rng: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    w = QuantSpec(bits=4, granularity=granularity, symmetric=symmetric, range=rng)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=32)))
    return model


def hand_minmax_qparams(w: torch.Tensor, granularity: str, symmetric: bool):
    """Scale and zero point of a 4-bit min/max quantizer, written out (rows are output channels)."""
    lo = w.amin(1, keepdim=True) if granularity == "channel" else w.min().reshape(1, 1)
    hi = w.amax(1, keepdim=True) if granularity == "channel" else w.max().reshape(1, 1)
    if symmetric:
        return torch.maximum(lo.abs(), hi) / 7, torch.zeros_like(lo), -7, 7
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = (hi - lo) / 15
    return s, -torch.round(lo / s), 0, 15


@pytest.mark.parametrize(
    "granularity, symmetric, rng",
    [
        ("channel", True, "minmax"),
        ("tensor", True, "minmax"),
        ("channel", False, "minmax"),
        ("tensor", True, "lsq"),
    ],
)
def test_adaround_on_one_linear_layer(granularity, symmetric, rng):
    model = one_linear(granularity, symmetric, rng)
    q = model[0]
    w = q.layer.weight.detach().clone()
    b = q.layer.bias.detach().clone()
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    x[:, :4] *= 5  # some input dimensions matter more: the best rounding is not the nearest
    if rng == "lsq":
        q.wq(w)  # LSQ: step initialised from the weight, then frozen
        s, z, qmin, qmax = q.wq.scale.detach().reshape(-1, 1).clone(), torch.zeros(1, 1), -7, 7
    else:
        s, z, qmin, qmax = hand_minmax_qparams(w, granularity, symmetric)
    info = adaround_(model, [x[:256], x[256:]], iters=300)
    w_new = q.layer.weight.detach()
    # the layer's quantizer reproduces the learned codes exactly (computed here from the written-back weight)
    if rng == "lsq":
        s2 = q.wq.scale.detach().reshape(-1, 1)
        z2 = z
    else:
        s2, z2, _, _ = hand_minmax_qparams(w_new, granularity, symmetric)
    assert torch.equal(s2, s) and torch.equal(z2, z)  # the same scale and zero point as before
    codes = torch.clamp(torch.round(w_new * (1.0 / s2)) + z2, qmin, qmax)
    assert torch.equal(q.wq.int_repr(w_new).float(), codes)
    # every code is floor or ceil of W/S (+Z), never further
    lo = torch.clamp(torch.floor(w / s) + z, qmin, qmax)
    hi = torch.clamp(torch.ceil(w / s) + z, qmin, qmax)
    assert bool(((codes == lo) | (codes == hi)).all())
    # output reconstruction error no worse than nearest rounding's
    nearest = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    ref = F.linear(x, w, b)
    err_ada = (F.linear(x, (codes - z) * s, b) - ref).norm()
    err_near = (F.linear(x, (nearest - z) * s, b) - ref).norm()
    assert err_ada <= err_near
    assert info["0"]["changed"] > 0  # it did change some roundings
    # and the model computes with those weights
    torch.testing.assert_close(model.eval()(x), F.linear(x, (codes - z) * s, b), rtol=0, atol=1e-5)


def test_pruned_weights_stay_zero():
    model = one_linear("channel", True, "minmax")
    q = model[0]
    mask = (torch.rand(q.layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    set_mask(q.layer, mask)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    adaround_(model, [x], iters=200)
    assert bool((q.layer.weight[mask == 0] == 0).all())
    assert bool((q.wq.int_repr(q.layer.weight)[mask == 0] == 0).all())


def test_raw_weight_parameters_keep_nearest_rounding_as_under_gptq():
    """A weight quantized in the graph (a raw parameter) is left at nearest rounding and listed under
    ``nearest_only``; the conv/linear layer beside it is rounded by AdaRound."""

    class RawW(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 8))
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(F.linear(x, self.w))

    torch.manual_seed(0)
    model, x = RawW(), torch.randn(64, 8)
    quantize_(model, QuantConfig(weight=QuantSpec(bits=3), act=QuantSpec(bits=8)), example=x[:2])
    model.train()
    model(x)
    model.eval()
    raw_before = model.w.detach().clone()
    out = adaround_(model, [x], iters=50)
    assert out["nearest_only"] == ["w_wq"] and list(
        k for k in out if k not in ("seconds", "nearest_only")
    ) == ["fc"]
    assert torch.equal(model.w, raw_before)  # untouched: its quantizer rounds it to nearest as before
    assert 0 <= out["fc"]["changed"] <= 1


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["quant.rounding=stochastic"], "quant.rounding"),
        (["quant.rounding=adaround", "quant.epochs=0", "quant.scheme=log"], "quant.rounding"),
        (["quant.rounding_iters=0"], "quant.rounding_iters"),
        (["quant.rounding_batches=-1"], "quant.rounding_batches"),
    ],
)
def test_bad_rounding_config_refused(tmp_path, overrides, key):
    cfg = compose([*TINY, f"cache_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Pipeline(cfg, tmp_path / "run")
    assert not any(tmp_path.iterdir())


def keys(tmp_path: Path, overrides: list[str]) -> dict[str, str]:
    return Pipeline(compose([*TINY, f"cache_dir={tmp_path / 'c'}", *overrides]), tmp_path / "run").keys


def test_rounding_in_the_qat_key_only_when_adaround(tmp_path):
    near = keys(tmp_path, ["quant.epochs=0"])
    assert keys(tmp_path, ["quant.epochs=0", "quant.rounding_iters=7"]) == near  # nearest: ignored
    ada = keys(tmp_path, ["quant.epochs=0", "quant.rounding=adaround"])
    assert ada["prune"] == near["prune"] and ada["qat"] != near["qat"]
    more = keys(tmp_path, ["quant.epochs=0", "quant.rounding=adaround", "quant.rounding_iters=7"])
    assert more["qat"] != ada["qat"]


def test_pipeline_ptq_with_adaround(tmp_path):
    cfg = compose(
        [*TINY, f"cache_dir={tmp_path / 'c'}", "export.enabled=false", "prune.ratio=0", "quant.epochs=0"]
        + ["quant.rounding=adaround", "quant.rounding_iters=20", "quant.rounding_batches=2"]
    )
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["final/quant_mode"] == "ptq" and rec["quant/rounding"] == "adaround"
    assert 0 < rec["quant/rounding_changed"] < 1 and rec["quant/rounding_seconds"] > 0


@pytest.mark.parametrize(
    "build, shape",
    [
        ("qpexp.models.mlp", (1, 40)),
        ("qpexp.models.lenet5", (1, 8, 8)),
        ("qpexp.archs.resnet.resnet20", (3, 8, 8)),  # graph model: residual adds, folded BatchNorm
    ],
)
def test_models_round_through_the_graph(build, shape):
    """Every quantized conv/linear layer of a prepared, calibrated model is rounded: its quantizer's codes
    are floor or ceil of the original weight over the scale (symmetric per-channel min/max: the scale is
    max|w| / 7 per output channel, computed here), some of them not the nearest."""
    import importlib

    mod, _, fn = build.rpartition(".")
    kwargs = {"width": 0.25} if "resnet" in build else {}
    torch.manual_seed(0)
    model = getattr(importlib.import_module(mod), fn)(shape, 10, **kwargs).eval()
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(weight=QuantSpec(bits=4, granularity="channel", symmetric=True), act=QuantSpec(bits=8))
    quantize_(model, cfg, example=x[:1])
    model.train()  # calibrate activation ranges, as QATStage.calibrate does
    with torch.no_grad():
        model(x)
    model.eval()
    layers = [m for m in model.modules() if type(m).__name__ == "QuantLayer"]
    before = [q.layer.weight.detach().clone() for q in layers]
    info = adaround_(model, [x[:32], x[32:]], iters=100)
    assert len(info) - 2 == len(layers) and info["nearest_only"] == []  # every layer rounded
    changed = 0
    for q, w in zip(layers, before):
        s = w.abs().flatten(1).amax(1).div(7).reshape(-1, *[1] * (w.dim() - 1))
        codes = q.wq.int_repr(q.layer.weight).float()
        lo, hi = torch.floor(w / s).clamp(-7, 7), torch.ceil(w / s).clamp(-7, 7)
        assert bool(((codes == lo) | (codes == hi)).all())
        changed += int((codes != torch.round(w / s).clamp(-7, 7)).sum())
    assert changed > 0
