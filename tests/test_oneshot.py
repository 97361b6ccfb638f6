"""Issue 24: one-shot compression from calibration data (GPTQ, SparseGPT, Wanda, N:M sparsity).

Every reference is written out here: convolutions by torch's own conv, least squares by
``torch.linalg.lstsq``, the best rounding by enumerating every code vector, the OBS update with
explicit inverses of the Hessian's sub-matrices, Wanda's norms and N:M index bits by hand.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from qpexp.core.prune.criteria import Target
from qpexp.core.prune.criteria.wanda import Wanda, row_masks
from qpexp.core.prune.nm import index_bits, nm_bits, nm_mask, satisfies_nm
from qpexp.core.prune.sparsegpt import sparsegpt_columns, sparsegpt_prune_
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.calibrate import calibrate_, input_rows
from qpexp.core.quant.gptq import gptq_, gptq_columns
from qpexp.core.quant.package import read_package


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (where error feedback matters)."""
    g = gen(seed)
    base = torch.randn(n, 2, generator=g)
    mix = torch.randn(2, d, generator=g)
    return base @ mix + 0.3 * torch.randn(n, d, generator=g)


# -- calibration: unfolded conv inputs ---------------------------------------------------------------
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 6, 5, stride=2, padding=2),
        nn.Conv1d(4, 4, 3, groups=2, dilation=2, padding="same"),
        nn.Conv2d(3, 8, 3, stride=1, padding=1, padding_mode="reflect"),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),  # depthwise
    ],
)
def test_input_rows_reproduce_the_conv(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([9] if isinstance(conv, nn.Conv1d) else [7, 7]))
    rows = input_rows(conv, x)  # (groups, n, d)
    g = conv.groups
    w = conv.weight.detach().reshape(g, conv.out_channels // g, -1)
    out = torch.cat([rows[i] @ w[i].T for i in range(g)], dim=1) + conv.bias.detach()
    ref = conv(x).detach()  # torch's own conv: (N, out, *spatial)
    ref = ref.reshape(ref.shape[0], ref.shape[1], -1).transpose(1, 2).reshape(-1, conv.out_channels)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# -- GPTQ --------------------------------------------------------------------------------------------
def test_gptq_error_feedback_is_the_least_squares_update():
    """Quantize only column 0: the other columns must become the least-squares best completion."""
    x = correlated(200, 6, 1).double()
    w = torch.randn(3, 6, generator=gen(2), dtype=torch.float64)
    h = x.T @ x / len(x)
    q0 = torch.round(w[:, 0] * 2) / 2

    def quant(j, col):
        return q0 if j == 0 else col

    got = gptq_columns(w, h, quant, block=4, damp=0.0)
    # min ||X (w' - w)^T|| with w'_0 = q0: w'_rest = w_rest - lstsq(X_rest, X_0 (q0 - w0))
    delta = torch.linalg.lstsq(x[:, 1:], x[:, :1] @ (q0 - w[:, 0]).reshape(1, -1)).solution
    ref = torch.cat([q0.reshape(-1, 1), w[:, 1:] - delta.T], dim=1)
    torch.testing.assert_close(got, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lazy_blocks_change_nothing(act_order):
    x = correlated(300, 10, 3).double()
    w = torch.randn(4, 10, generator=gen(4), dtype=torch.float64)
    h = x.T @ x / len(x)

    def quant(j, col):
        return torch.round(col * 3) / 3

    ref = gptq_columns(w, h, quant, block=1, damp=0.01, act_order=act_order)
    for block in (3, 10, 128):
        torch.testing.assert_close(gptq_columns(w, h, quant, block, 0.01, act_order), ref)


def one_quant_linear(d_in: int, d_out: int, bits: int, granularity="channel", symmetric=True, rng="minmax"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    w = QuantSpec(bits=bits, granularity=granularity, symmetric=symmetric, range=rng)
    quantize_(model, QuantConfig(weight=w, act=QuantSpec(bits=32)))
    return model


def test_gptq_on_a_tiny_layer_against_every_rounding():
    """2-bit narrow symmetric codes {-1, 0, 1}, 5 inputs: all 3^5 code vectors per row enumerated."""
    model = one_quant_linear(5, 3, bits=2)
    q = model[0]
    w = q.layer.weight.detach().clone()
    x = correlated(400, 5, 5)
    s = w.abs().amax(1, keepdim=True) / 1  # qmax = 1 at 2 bits, narrow
    out = gptq_(model, [x[:200], x[200:]], damp=1e-6)
    codes = q.wq.int_repr(q.layer.weight)
    assert codes.min() >= -1 and codes.max() <= 1  # inside the grid
    torch.testing.assert_close(q.layer.weight.detach(), codes * s)  # stored exactly on the grid

    def err(c, row):
        return float((x @ (c * s[row] - w[row]) ).pow(2).mean())  # fmt: skip

    nearest = torch.clamp(torch.round(w / s), -1, 1)
    best = 0.0
    for row in range(3):
        # the range setter (max |w|) keeps its code: enumerate the other four
        grid = itertools.product((-1.0, 0.0, 1.0), repeat=5)
        cands = [torch.tensor(c) for c in grid]
        cands = [
            c for c in cands if all(c[j] == nearest[row, j] for j in range(5) if w[row, j].abs() == s[row])
        ]
        best += min(err(c, row) for c in cands)
    got = sum(err(codes[r].float(), r) for r in range(3))
    near = sum(err(nearest[r], r) for r in range(3))
    assert best <= got + 1e-6 <= near + 2e-6
    assert got < 0.8 * near  # correlated inputs: error feedback pays
    assert out["layers"]["0"]["mse_gptq"] <= out["layers"]["0"]["mse_nearest"]


@pytest.mark.parametrize(
    "granularity, symmetric, rng",
    [
        ("channel", True, "minmax"),
        ("tensor", True, "minmax"),
        ("channel", False, "minmax"),
        ("tensor", True, "lsq"),
    ],  # fmt: skip
)
def test_gptq_codes_are_the_quantizers_and_beat_nearest(granularity, symmetric, rng):
    model = one_quant_linear(32, 8, bits=3, granularity=granularity, symmetric=symmetric, rng=rng)
    q = model[0]
    w = q.layer.weight.detach().clone()
    q.wq(w)  # LSQ: its step from the float weight (GPTQ does the same)
    nearest = q.wq.int_repr(w)
    x = correlated(512, 32, 6)
    gptq_(model, [x[:256], x[256:]])
    codes = q.wq.int_repr(q.layer.weight)
    assert q.wq.qmin <= int(codes.min()) and int(codes.max()) <= q.wq.qmax
    ref = x @ w.T

    def out_err(weight):
        return float((x @ weight.T - ref).pow(2).mean())

    fq = q.wq(q.layer.weight).detach()  # the weight the model computes with
    assert out_err(fq) < 0.7 * out_err(q.wq(w).detach())
    assert not torch.equal(codes, nearest)


def test_gptq_keeps_pruned_weights_zero():
    from qpexp.core.prune import set_mask

    model = one_quant_linear(16, 4, bits=4)
    lin = model[0].layer
    mask = (torch.rand(lin.weight.shape, generator=gen(7)) > 0.5).float()
    set_mask(lin, mask)
    gptq_(model, [correlated(256, 16, 8)])
    assert torch.all(lin.weight[mask == 0] == 0)
    assert torch.all(model[0].wq.int_repr(lin.weight)[mask == 0] == 0)


# -- SparseGPT -------------------------------------------------------------------------------------
def obs_reference(w: torch.Tensor, h: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Row by row, columns in order: pruning column j of the remaining set F = {j..d-1} moves the
    remaining weights by -(w_j / [H_F^-1]_jj) [H_F^-1]_{:, j} (Hassibi & Stork's OBS step)."""
    w = w.clone()
    d = w.shape[1]
    for r in range(w.shape[0]):
        for j in range(d):
            if pruned[r, j]:
                hinv = torch.linalg.inv(h[j:, j:])
                w[r, j:] -= w[r, j] / hinv[0, 0] * hinv[:, 0]
                w[r, j] = 0.0
    return w


def test_sparsegpt_mask_and_update_on_a_4x8_layer():
    x = correlated(100, 8, 9).double()
    h = x.T @ x / len(x)
    w = torch.randn(4, 8, generator=gen(10), dtype=torch.float64)
    got, keep = sparsegpt_columns(w, h, 0.5, block=8, damp=0.0)
    # saliency of each weight before any update: w^2 / [H_F^-1]_jj, F = {j..7}
    sal = torch.stack([w[:, j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(8)], dim=1)
    pruned = torch.zeros(32, dtype=torch.bool)
    pruned[torch.argsort(sal.reshape(-1))[:16]] = True
    pruned = pruned.reshape(4, 8)
    assert torch.equal(~keep, pruned)
    torch.testing.assert_close(got, obs_reference(w, h, pruned), atol=1e-9, rtol=1e-9)
    # and it reconstructs the output better than zeroing the same weights without the update
    masked = w * ~pruned

    def err(v):
        return float(((v - w) @ h * (v - w)).sum())

    assert err(got) < err(masked)


def test_sparsegpt_nm_keeps_n_of_every_m_with_the_obs_update():
    x = correlated(100, 8, 11).double()
    h = x.T @ x / len(x)
    w = torch.randn(4, 8, generator=gen(12), dtype=torch.float64)
    got, keep = sparsegpt_columns(w, h, nm=(2, 4), block=8, damp=0.0)
    assert torch.all(keep.reshape(4, 2, 4).sum(2) == 2)
    torch.testing.assert_close(got, obs_reference(w, h, ~keep), atol=1e-9, rtol=1e-9)
    # the first group's choice is by hand: the 2 lowest w^2 / [H_F^-1]_jj of columns 0..3
    sal = torch.stack([w[:, j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(4)], dim=1)
    low = torch.argsort(sal, dim=1)[:, :2]
    assert torch.equal(
        torch.sort(low, 1).values, torch.sort(torch.nonzero(~keep[:, :4])[:, 1].reshape(4, 2), 1).values
    )


def test_sparsegpt_on_a_model_sets_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 13, 5))
    x = torch.randn(64, 2, 16)
    ratios = {"0": 0.5, "3": 0.5}
    sparsegpt_prune_(model, [x], ratios)
    for m in (model[0], model[3]):
        assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
        assert torch.equal(m.weight == 0, m.weight_mask == 0)
    sparsegpt_prune_(model, [x], {"0": 0.5, "3": 0.5}, nm=(2, 4))
    assert satisfies_nm(model[3].weight, 2, 4)


# -- Wanda -------------------------------------------------------------------------------------------
def test_wanda_scores_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    x = torch.randn(5, 2, 6)
    crit = Wanda()
    crit.calibrate(model, [x[:2], x[2:]])
    conv, lin = model[0], model[2]
    # conv column (c, t) multiplies x[n, c, l + t] for l = 0..3
    norm = torch.tensor([[sum(float(x[n, c, l + t]) ** 2 for n in range(5) for l in range(4)) ** 0.5
                          for t in range(3)] for c in range(2)])  # fmt: skip
    ref = conv.weight.detach().abs() * norm.reshape(1, 2, 3)
    torch.testing.assert_close(crit(Target("0", conv.weight)), ref, rtol=1e-5, atol=1e-6)
    h = conv(x).flatten(1).detach()
    ref = lin.weight.detach().abs() * h.pow(2).sum(0).sqrt()
    torch.testing.assert_close(crit(Target("2", lin.weight)), ref, rtol=1e-5, atol=1e-6)
    mask = row_masks(ref, 0.5)
    assert torch.all(mask.sum(1) == 6)
    for r in range(2):  # each row keeps its own 6 largest
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == set(torch.topk(ref[r], 6).indices.tolist())


def test_row_scope_by_hand_and_masks_only_grow():
    """prune.scope=row: every output row loses round(r x its length), its own lowest; a row that
    already lost more keeps them lost (and keeps its minimum)."""
    from qpexp.core.prune import PruneConfig, get_mask, prune_step
    from qpexp.core.prune.unstructured import row_masks as rows

    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    assert rows(s, 0.5).tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    inf = -math.inf
    s = torch.tensor([[inf, inf, inf, 2.0], [inf, 0.7, 0.1, 0.9]])
    assert rows(s, 0.5).tolist() == [[0, 0, 0, 1], [0, 1, 0, 1]]
    layer = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    cfg = PruneConfig(ratio=0.6, scope="row")
    for target in (0.3, 0.6):  # two steps: 3 then 6 of every row of 10, 2 then 4 (round(3.6)) of 6
        prune_step(layer, cfg, target)
        for m, width in ((layer[0], 10), (layer[2], 6)):
            kept = get_mask(m, "weight").sum(1)
            assert torch.all(kept == width - round(target * width)), (target, kept)
            w = m.weight.detach().abs() * get_mask(m, "weight")
            for r in range(w.shape[0]):  # what each row keeps is its own largest |w|
                top = torch.topk(m.weight.detach()[r].abs(), int(kept[r])).indices
                assert set(torch.nonzero(w[r]).flatten().tolist()) == set(top.tolist())


# -- N:M ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_per_group(n, m):
    s = torch.randn(6, 3, 8, generator=gen(13))  # 24 columns per row: whole groups
    mask = nm_mask(s, n, m)
    groups = mask.reshape(6, -1, m)
    assert torch.all(groups.sum(2) == n)
    flat = s.reshape(6, -1, m)
    for r, g in itertools.product(range(6), range(24 // m)):
        assert set(torch.nonzero(groups[r, g]).flatten().tolist()) == set(
            torch.topk(flat[r, g], n).indices.tolist()
        )
    assert satisfies_nm(s * mask, n, m)


def test_nm_size_by_hand():
    assert (index_bits(2, 4), index_bits(4, 8), index_bits(1, 4)) == (3, 7, 2)  # C = 6, 70, 4
    w = torch.randn(3, 10, generator=gen(14))
    w = w * nm_mask(w.abs(), 2, 4)
    # per row: two groups of 4 at 2 x 4 bits + 3 index bits, a short group of 2 keeping both (0 bits)
    assert nm_bits(w, 2, 4, bits=4) == 3 * (2 * (2 * 4 + 3) + 2 * 4 + 0)
    assert nm_bits(torch.ones(3, 8), 2, 4, bits=4) is None  # 4 nonzeros in a group of 4: no 2:4 layout
    assert math.comb(4, 2) == 6


def test_calibrate_sequential_sees_compressed_predecessors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    seen = {}

    def zero_first(site, stats):
        seen[site.name] = stats.sq_norms.sum().item()
        if site.name == "0":
            with torch.no_grad():
                model[0].weight.zero_()
                model[0].bias.zero_()

    calibrate_(model, [x], zero_first, sequential=True, hessian=False)
    assert seen["1"] == 0.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    calibrate_(model, [x], zero_first, sequential=False, hessian=False)
    assert seen["1"] > 0.0


# -- through the pipeline ----------------------------------------------------------------------------
def _run(tmp_path, overrides):
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline

    cfg = compose([*TINY, f"cache_dir={tmp_path / 'c'}", *overrides])
    return Pipeline(cfg, tmp_path / "run").run()


ONESHOT = ["prune.finetune_epochs=0", "prune.schedule=oneshot", "quant.epochs=0", "prune.calib_batches=2"]


@pytest.mark.parametrize(
    "prune",
    [
        ["prune.method=sparsegpt", "prune.structure=nm", "prune.scope=layer"],
        ["prune.criterion=wanda", "prune.scope=layer"],
        ["prune.criterion=wanda", "prune.scope=row"],
    ],
)
def test_oneshot_pipeline_end_to_end(tmp_path, prune):
    """No training after the baseline: pruned from calibration data, GPTQ-rounded, exported to the
    integer file and ONNX, whose accuracies the deploy step checks against the fake-quantized model."""
    rec = _run(tmp_path, [*ONESHOT, *prune, "quant.rounding=gptq", "quant.bits_w=4"])
    assert rec["final/quant_mode"] == "ptq" and rec["prune/mode"] == "oneshot"
    assert rec["prune/method"] == ("sparsegpt" if "prune.method=sparsegpt" in prune else "mask")
    assert rec["prune/realized_ratio"] == pytest.approx(0.5, abs=0.03)
    assert rec["quant/rounding"] == "gptq" and 0 < rec["quant/rounding_changed"] < 1
    assert rec["quant/oneshot_forward_seconds"] > 0 and rec["quant/oneshot_calib_seconds"] > 0
    assert rec["status"] == "ok", rec.get("status_reason")
    if "prune.structure=nm" in prune:
        assert rec["final/size_bits_nm"] < rec["final/size_bits"]
        assert rec["prune/oneshot_compress_seconds"] > 0
        # the integer file stores every layer in the N:M layout: its payload is the N:M count
        header = json.loads(read_package(rec["deploy/path"])[0])
        assert {op["weight"]["layout"] for op in header["ops"] if "weight" in op} == {"nm"}
        assert rec["deploy/accounted_payload_bits"] == rec["final/size_bits_nm"]


def test_oneshot_then_short_finetune_and_qat(tmp_path):
    """SparseGPT at 2:4 followed by a fine-tune epoch, GPTQ followed by a QAT epoch: the 2:4 pattern
    survives the fine-tune and QAT (checked group by group here: at most 2 nonzeros in every 4
    consecutive inputs of each output row), the record says QAT after GPTQ rounding."""
    from qpexp.io import safe_torch_load

    over = ["prune.schedule=oneshot", "prune.calib_batches=2", "prune.finetune_epochs=1", "quant.epochs=1"]
    over += ["prune.method=sparsegpt", "prune.structure=nm", "prune.scope=layer", "quant.rounding=gptq"]
    rec = _run(tmp_path, [*over, "quant.bits_w=4"])
    assert rec["final/quant_mode"] == "qat" and rec["quant/rounding"] == "gptq"
    assert rec["prune/method"] == "sparsegpt" and rec["status"] == "ok", rec.get("status_reason")
    final = safe_torch_load(f"{rec['artifacts/qat']}/model.pt")["model"]
    checked = 0
    for name, p in final.items():  # the state dict: latent weights, pruned ones exactly zero
        if not name.endswith("weight") or p.dim() < 2:
            continue
        rows = p.reshape(p.shape[0], -1)
        for r in rows:
            for start in range(0, len(r), 4):
                assert int((r[start : start + 4] != 0).sum()) <= 2, name
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["prune.structure=nm", "prune.n=4", "prune.m=4", "prune.schedule=oneshot"], "prune.n"),
        (["prune.structure=nm", "prune.n=1", "prune.schedule=oneshot"], "prune.ratio"),
        (["prune.structure=nm"], "prune.schedule"),
        (["prune.method=obs"], "prune.method"),
        (["prune.method=sparsegpt", "prune.structure=channel"], "prune.method"),
        (["prune.scope=row", "prune.structure=channel"], "prune.scope"),
        (["prune.scope=row", "prune.method=sparsegpt"], "prune.scope"),
        (["prune.finetune_epochs=0", "prune.scope=auto"], "prune.scope"),
        (["quant.gptq_block=0"], "quant.gptq_block"),
    ],
)
def test_bad_oneshot_config_refused(tmp_path, overrides, key):
    from conftest import TINY, compose

    from qpexp.pipeline import Pipeline
    from qpexp.schema import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Pipeline(compose([*TINY, f"cache_dir={tmp_path}", *overrides]), tmp_path / "run")
    assert not any(tmp_path.iterdir())


# -- GPTQ on raw weights quantized in the graph (attention's packed in_proj_weight) -------------------
class _Attention(nn.Module):
    """Self-attention (``calls=("self",)``), cross-attention (``("cross",)``) or both, one module."""

    def __init__(self, batch_first=True, calls=("self",)):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.calls = calls

    def forward(self, x):
        out = 0
        for c in self.calls:
            kv = x if c == "self" else torch.flip(x, [0])
            out = out + self.attn(x, kv, kv, need_weights=False)[0]
        return out


class _RawLinear(nn.Module):
    """A raw weight consumed by one ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 16, generator=gen(5)) / 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w)


def _prepared(model, act_bits, x):
    cfg = QuantConfig(weight=QuantSpec(bits=3, granularity="channel"), act=QuantSpec(bits=act_bits))
    quantize_(model, cfg, example=x)
    with torch.no_grad():  # activation ranges
        model.train()
        model(x)
    return model.eval()


def _on_own_grid(wq, w, w0):
    """The weight the model computes with, checked to be ``S (q - Z)`` with integer codes ``q`` in
    ``[qmin, qmax]`` and the per-channel scale and zero point ``wq`` recomputes from the written
    weight ``w`` (the same as from the float weight ``w0``: the range is kept)."""
    scale, zero = (t.double().reshape(-1, 1) for t in wq.qparams(w))
    for a, b in zip(wq.qparams(w), wq.qparams(w0)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0)
    codes = torch.clamp(torch.round(w.double() / scale) + zero, wq.qmin, wq.qmax)
    deq = wq(w).detach()
    assert torch.allclose(deq.double(), (codes - zero) * scale, rtol=0, atol=1e-6)
    assert torch.equal(wq.int_repr(w).double(), codes)
    return deq


@pytest.mark.parametrize("act_bits", [8, 32])
@pytest.mark.parametrize("batch_first", [True, False])
def test_gptq_rounds_self_attention_in_proj_weight(act_bits, batch_first):
    """Self-attention's packed ``in_proj_weight`` (one ``F.linear`` on the whole weight) is rounded by
    GPTQ onto its own quantizer's grid: codes on the grid of the scales its quantizer recomputes from
    the written weight, the layer's output error on the calibration inputs (taken here: the attention
    input through the pass's input quantizer of that product) no larger than nearest rounding's, and
    nothing left in ``nearest_only``."""
    torch.manual_seed(0)
    x = correlated(8 * 6, 16, 3).reshape(8, 6, 16)  # (N, L, E), or (L, N, E) when not batch_first
    model = _prepared(_Attention(batch_first), act_bits, x)
    attn = model.attn
    wq = attn.in_proj_weight_wq
    linear_q = getattr(attn, "linear_q0", None)
    assert (linear_q is None) == (act_bits == 32)
    w0 = attn.in_proj_weight.detach().clone()
    nearest = wq(w0).detach()
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model(x)
    hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], x)  # the attention's input is the model's
    with torch.no_grad():
        rows = (linear_q(x) if linear_q is not None else x).reshape(-1, 16).double()

    info = gptq_(model, [x])
    assert info["nearest_only"] == []
    rec = info["layers"]["attn.in_proj_weight"]
    assert not rec["kept_nearest"] and rec["changed"] > 0
    w = attn.in_proj_weight.detach()
    deq = _on_own_grid(wq, w, w0)
    assert not torch.equal(deq, nearest)

    def err(v):
        return float((rows @ (v.double() - w0.double()).T).pow(2).sum())

    assert err(deq) <= err(nearest) * (1 + 1e-9), (err(deq), err(nearest))


@pytest.mark.parametrize("calls", [("cross",), ("self", "cross")])
def test_gptq_leaves_cross_attention_in_proj_weight_at_nearest(calls):
    """Cross-attention multiplies three chunks of ``in_proj_weight`` by three inputs: no single
    product to calibrate on, so the weight is left as it is (nearest rounding, by its quantizer) and
    named in ``nearest_only``, also when the same module is called in self-attention too."""
    torch.manual_seed(0)
    x = correlated(8 * 6, 16, 3).reshape(8, 6, 16)
    model = _prepared(_Attention(True, calls), 8, x)
    w0 = model.attn.in_proj_weight.detach().clone()
    info = gptq_(model, [x])
    assert info["nearest_only"] == ["attn.in_proj_weight_wq"]
    assert "attn.in_proj_weight" not in info["layers"] and "attn.out_proj" in info["layers"]
    assert torch.equal(model.attn.in_proj_weight, w0)


@pytest.mark.parametrize("act_bits", [8, 32])
def test_gptq_on_a_raw_weight_under_one_linear(act_bits):
    """Any raw weight whose only consumer is one ``F.linear``, behind an input quantizer, is rounded
    by GPTQ (codes on its quantizer's grid, output error not above nearest's); without an input
    quantizer (activations in float) its input is not captured: nearest rounding, named."""
    x = correlated(64, 16, 4)
    model = _prepared(_RawLinear(), act_bits, x)
    w0 = model.w.detach().clone()
    nearest = model.w_wq(w0).detach()
    info = gptq_(model, [x])
    if act_bits == 32:
        assert info["nearest_only"] == ["w_wq"] and torch.equal(model.w, w0)
        return
    assert info["nearest_only"] == [] and "w" in info["layers"]
    deq = _on_own_grid(model.w_wq, model.w.detach(), w0)
    assert not torch.equal(deq, nearest)
    with torch.no_grad():
        rows = model.linear_q0(x).double()

    def err(v):
        return float((rows @ (v.double() - w0.double()).T).pow(2).sum())

    assert err(deq) <= err(nearest) * (1 + 1e-9), (err(deq), err(nearest))


def test_oneshot_gptq_on_the_transformer_end_to_end(tmp_path):
    """The transformer through the pipeline, GPTQ without training after it: in_proj_weight rounded
    too (nothing at nearest rounding), and the integer file and ONNX agree with the model."""
    rec = _run(tmp_path, ["model=transformer", "model.dim=16", "model.depth=1", "model.heads=2",
                          "quant.rounding=gptq", "quant.epochs=0", "quant.bits_w=4"])  # fmt: skip
    assert rec["quant/rounding"] == "gptq" and 0 < rec["quant/rounding_changed"] < 1
    assert (
        not rec.get("quant/nearest_only")
        and "quant/oneshot/blocks.0.attn.in_proj_weight/compress_seconds" in rec
    )
    assert rec["status"] == "ok", rec.get("status_reason")


# -- every built-in model -------------------------------------------------------------------------------
EVERY_MODEL = {  # name: (one sample's shape, builder options: small widths, as tests/test_archs.py)
    "mlp": ((40,), {}),
    "mlp:logistic": ((40,), {"hidden": ()}),  # model=logistic
    "cnn1d": ((1, 40), {}),
    "gru": ((1, 40), {}),
    "lenet300": ((1, 28, 28), {}),
    "lenet5": ((1, 8, 8), {}),
    "lenet5_caffe": ((1, 28, 28), {}),
    "resnet20": ((3, 32, 32), {"width": 0.25}),
    "vgg11": ((3, 32, 32), {"width": 0.0625}),
    "mobilenetv2": ((3, 32, 32), {"width": 0.25, "last_channel": 32}),
    "transformer": ((1, 40), {"dim": 16, "depth": 1, "heads": 2}),
}


def _built(name: str):
    import qpexp.models as M

    shape, opts = EVERY_MODEL[name]
    torch.manual_seed(0)
    model = getattr(M, name.split(":")[0])(shape, 10, **opts).eval()
    return model, torch.randn(16, *shape, generator=gen(1))


@pytest.mark.parametrize("name", sorted(EVERY_MODEL))
def test_every_method_on_every_built_in_model(name):
    """SparseGPT at 50%, Wanda per output row, 2:4 by magnitude and GPTQ at 4 bits, each on a fresh
    copy of every built-in model (conv, linear, recurrent and attention weights), from 16 random
    inputs: counts checked row by row or group by group here, GPTQ's codes on the quantizer's grid,
    every GPTQ-able layer reached (the rest named in ``nearest_only``), outputs finite."""
    from qpexp.core.prune import PruneConfig, get_mask, prunable_weights, prune_step
    from qpexp.core.prune.sparsegpt import sparsegpt_step
    from qpexp.core.prune.unstructured import keep_minimum
    from qpexp.core.quant.graph import graph_quantizers
    from qpexp.core.quant.layers import quant_layers

    model, x = _built(name)
    realized = sparsegpt_step(
        model, PruneConfig(ratio=0.5, scope="layer", method="sparsegpt"), 0.5, calib=[x]
    )
    assert realized and all(abs(r - 0.5) <= 0.07 for r in realized.values()), realized
    assert torch.isfinite(model(x)).all()

    model, x = _built(name)
    crit = Wanda()
    crit.calibrate(model, [x])
    prune_step(model, PruneConfig(ratio=0.5, scope="row", criterion="wanda"), 0.5, criterion=crit)
    for lname, m, pname in prunable_weights(model):
        rows = get_mask(m, pname).reshape(getattr(m, pname).shape[0], -1)
        n = rows.shape[1]
        pruned = min(round(0.5 * n), n - keep_minimum(n, 0.01))
        assert torch.all(rows.sum(1) == n - pruned), lname

    model, x = _built(name)
    prune_step(model, PruneConfig(ratio=0.5, structure="nm", schedule="oneshot"), 0.5)
    for lname, m, pname in prunable_weights(model):
        rows = getattr(m, pname).detach().reshape(getattr(m, pname).shape[0], -1)
        for start in range(0, rows.shape[1], 4):
            assert int((rows[:, start : start + 4] != 0).sum(1).max()) <= 2, lname

    model, x = _built(name)
    spec = QuantSpec(bits=4, granularity="channel")
    quantize_(model, QuantConfig(weight=spec, act=QuantSpec(bits=32)), example=x)
    info = gptq_(model, [x])
    layers = {n: (q.wq, q.layer.weight) for n, q in quant_layers(model)}
    raw = dict((n, q) for n, q in graph_quantizers(model) if getattr(q, "is_weight", False))
    # self-attention's packed in_proj_weight (one F.linear on the whole weight) is rounded by GPTQ too
    attn = {n: q for n, q in raw.items() if n.endswith(".in_proj_weight_wq")}
    for n, q in attn.items():
        layers[n.removesuffix("_wq")] = (q, model.get_submodule(n.rpartition(".")[0]).in_proj_weight)
    assert set(info["layers"]) == set(layers)  # every conv/linear layer and in_proj_weight reached
    for lname, (wq, w) in layers.items():
        codes = wq.int_repr(w)
        assert wq.qmin <= int(codes.min()) and int(codes.max()) <= wq.qmax, lname
        assert "skipped" not in info["layers"][lname], lname
    assert set(info.get("nearest_only", [])) == set(raw) - set(attn)  # the others (GRU) keep nearest, named
    assert torch.isfinite(model(x)).all()
