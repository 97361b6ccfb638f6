"""Per-layer sensitivity (analysis=sensitivity) and mixed precision under a size budget (bits_w=auto)."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
import torch
from conftest import TINY, compose
from omegaconf import OmegaConf

from qpexp.core import PruneConfig, QuantConfig, QuantSpec, prune_step, quantize_, size_bits
from qpexp.core.accounting import layer_views
from qpexp.core.mixed import layer_sizes, solve
from qpexp.core.sensitivity import evaluate, prune_sensitivity, quant_sensitivity
from qpexp.errors import ConfigError
from qpexp.models import cnn1d


# -- the solver -------------------------------------------------------------------------------------
def test_solver_hand_table_where_greedy_is_wrong():
    """Two layers, widths 2 and 8.

    Table 1, budget 10. By hand: (a=8, b=2) costs 0 + 5 = 5 at 6 + 4 = 10 bits; (a=2, b=8) costs
    3 + 0 = 3 at 2 + 8 = 10; (a=2, b=2) costs 8 at 6; (a=8, b=8) needs 14 > 10. Optimum: a=2, b=8.

    Table 2, budget 12 (all-8 is 16). Lowering a saves 2 bits for 0.8 (0.4 per bit), lowering b
    saves 8 bits for 6.0 (0.75 per bit). Greedy (cheapest cost per saved bit first) lowers a, is
    still over budget (14), then lowers b: cost 6.8. Lowering b alone fits (8 bits) for 6.0.
    """
    sizes = {"a": {2: 2, 8: 6}, "b": {2: 4, 8: 8}}
    costs = {"a": {2: 3.0, 8: 0.0}, "b": {2: 5.0, 8: 0.0}}
    assert solve(costs, sizes, 10) == ({"a": 2, "b": 8}, 10, 3.0)
    sizes = {"a": {2: 4, 8: 6}, "b": {2: 2, 8: 10}}
    costs = {"a": {2: 0.8, 8: 0.0}, "b": {2: 6.0, 8: 0.0}}
    assert greedy_reference(costs, sizes, 12) == ({"a": 2, "b": 2}, 6.8)
    assert solve(costs, sizes, 12) == ({"a": 8, "b": 2}, 8, 6.0)


def greedy_reference(costs, sizes, budget):
    """Start at every layer's widest width; lower the layer with the least cost increase per bit
    saved (one width step at a time) until the size fits."""
    a = {n: max(sizes[n]) for n in sizes}
    while sum(sizes[n][a[n]] for n in a) > budget:
        best = None
        for n in a:
            lower = [b for b in sizes[n] if b < a[n]]
            if not lower:
                continue
            b = max(lower)
            rate = (costs[n][b] - costs[n][a[n]]) / (sizes[n][a[n]] - sizes[n][b])
            if best is None or rate < best[0]:
                best = (rate, n, b)
        a[best[1]] = best[2]
    return a, sum(costs[n][a[n]] for n in a)


@pytest.mark.parametrize("seed", range(5))
def test_solver_equals_exhaustive_search(seed):
    rng = random.Random(seed)
    widths = (2, 3, 4, 8)
    layers = [f"l{i}" for i in range(4)]
    sizes = {n: {b: rng.randint(10, 40) * b for b in widths} for n in layers}
    costs = {n: {b: round(rng.uniform(0, 5) / b, 3) for b in widths} for n in layers}
    budget = rng.randint(200, 700)
    best = None
    for combo in itertools.product(widths, repeat=len(layers)):
        size = sum(sizes[n][b] for n, b in zip(layers, combo))
        cost = sum(costs[n][b] for n, b in zip(layers, combo))
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, size)
    got = solve(costs, sizes, budget)
    if best is None:
        assert got is None
    else:
        assignment, size, cost = got
        assert cost == pytest.approx(best[0]) and size <= budget
        assert size == sum(sizes[n][b] for n, b in assignment.items())


def test_solver_infeasible():
    assert solve({"a": {2: 1.0}}, {"a": {2: 11}}, 10) is None


# -- sizes and sensitivities on a real model ----------------------------------------------------------
def small_model(ratio=0.6):
    torch.manual_seed(0)
    m = cnn1d((40,), 10)
    prune_step(m, PruneConfig(ratio=ratio, scope="global"), target=ratio)
    x = torch.randn(300, 40)
    y = m(x).argmax(1)  # labels the model gets mostly right: quantization errors show
    y[::7] = torch.randint(0, 10, y[::7].shape)
    return m, [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)]


QUANT = {
    "lsq_tensor": QuantConfig(
        QuantSpec(4, granularity="tensor", symmetric=True, range="lsq"),
        QuantSpec(8, granularity="tensor", symmetric=False, range="lsq"),
    ),
    "minmax_channel": QuantConfig(QuantSpec(4, granularity="channel", symmetric=True, range="minmax")),
}


@pytest.mark.parametrize("kind", sorted(QUANT))
def test_assignment_size_is_the_real_models_size(kind):
    """Any assignment's planned size (rows + rest) equals size_bits of the model quantized with it."""
    q = QUANT[kind]
    model, batches = small_model()
    example = batches[0][0][:1]
    sizes, fixed = layer_sizes(model, q, example=example)
    rng = random.Random(1)
    costs = {n: {b: rng.random() for b in sizes[n]} for n in sizes}
    budget = fixed + sum(sizes[n][3] for n in sizes)  # room for about 3 bits each
    assignment, planned, _ = solve(costs, sizes, budget - fixed)
    m = copy.deepcopy(model)
    quantize_(m, QuantConfig(q.weight, q.act, overrides=dict(assignment)), example=example)
    assert {v.name: v.bits_w for v in layer_views(m)} == assignment
    assert size_bits(m) == planned + fixed <= budget


def test_assignment_size_with_raw_weight_matrices():
    """A transformer: attention's in_proj_weight (no conv/linear layer) stays at the base width (8
    bits with bits_w=auto) in the plan and in the quantized model; planned size = size_bits."""
    from qpexp.archs import transformer

    torch.manual_seed(0)
    model = transformer((40,), 10, dim=16, depth=1, heads=2)
    prune_step(model, PruneConfig(ratio=0.5), target=0.5)
    x = torch.randn(32, 40)
    q = QuantConfig(QuantSpec(8, granularity="channel"), QuantSpec(8, symmetric=False))
    sizes, fixed = layer_sizes(model, q, example=x[:1])
    assert "blocks.0.attn.in_proj_weight" not in sizes and "blocks.0.fc1" in sizes
    assignment = {n: (3 if i % 2 else 5) for i, n in enumerate(sizes)}
    m = copy.deepcopy(model)
    quantize_(m, QuantConfig(q.weight, q.act, overrides=assignment), example=x[:1])
    bits = {v.name: v.bits_w for v in layer_views(m)}
    assert bits["blocks.0.attn.in_proj_weight"] == 8 and all(bits[n] == b for n, b in assignment.items())
    assert size_bits(m) == fixed + sum(sizes[n][b] for n, b in assignment.items())


def fake_quant_sym_tensor(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-tensor min/max fake quantization, written out: S = max|w| / (2^(b-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.float32(np.abs(w).max()) / np.float32(qmax)
    return (np.clip(np.round(w * (np.float32(1) / scale)), -qmax, qmax) * scale).astype(np.float32)


def test_quant_sensitivity_against_a_hand_quantized_layer():
    model, batches = small_model()
    q = QuantConfig(QuantSpec(4, granularity="tensor", symmetric=True, range="minmax"))
    got = quant_sensitivity(model, batches, q, (2, 3), example=batches[0][0][:1])
    assert got[""][32] == evaluate(model, batches)  # every weight in float: the model itself
    for name in ("conv2", "fc"):
        for bits in (2, 3):
            ref = copy.deepcopy(model)
            layer = getattr(ref, name)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(fake_quant_sym_tensor(layer.weight.numpy(), bits)))
            acc, loss = evaluate(ref, batches)
            assert got[name][bits][0] == acc
            assert got[name][bits][1] == pytest.approx(loss, rel=1e-5)
    assert got["fc"][2][1] != got[""][32][1]  # the layer's quantization was measured, not the float model


def test_prune_sensitivity_against_hand_pruned_layer_and_model_restored():
    model, batches = small_model(ratio=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = prune_sensitivity(model, batches, PruneConfig(criterion="l1"), (0.5, 0.9))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name in ("conv1", "conv3"):
        for r in (0.5, 0.9):
            ref = copy.deepcopy(model)
            w = getattr(ref, name).weight
            flat = w.detach().abs().reshape(-1).numpy()
            k = round(r * flat.size)  # the k smallest |w| (zeros first), as torch's l1_unstructured
            order = np.argsort(flat, kind="stable")[:k]
            with torch.no_grad():
                w.view(-1)[torch.from_numpy(order)] = 0
            assert got[name][r] == pytest.approx(evaluate(ref, batches), rel=1e-6)


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["quant.bits_w=abc"], "quant.bits_w"),
        (["quant.bits_w=auto"], "quant.target_ratio"),
        (["quant.bits_w=auto", "quant.target_ratio=1"], "quant.target_ratio"),
        (["quant.bits_w=auto", "quant.target_ratio=8", "quant.budget_bits=100"], "quant.target_ratio"),
        (["quant.bits_w=auto", "quant.budget_bits=-5"], "quant.budget_bits"),
        (["quant.bits_w=4", "quant.target_ratio=8"], "quant.target_ratio"),
        (["quant.bits_w=auto", "quant.target_ratio=8", "quant.last_bits=8"], "quant.last_bits"),
        (["quant.bits_w=auto", "quant.target_ratio=8", "+quant.overrides={conv1: 8}"], "quant.overrides"),
        (["analysis=sensitivity", "analysis.widths=[2,9]"], "analysis.widths"),
        (["analysis=sensitivity", "analysis.ratios=[0.5,1.0]"], "analysis.ratios"),
    ],
)
def test_bad_config_names_the_key(overrides, key, tmp_path):
    from qpexp.schema import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose([*TINY, f"cache_dir={tmp_path}", *overrides]))


def test_good_configs_validate(tmp_path):
    from qpexp.schema import validate

    t = validate(compose(["quant.bits_w=auto", "quant.target_ratio=12"]))
    assert t.quant.bits_w == "auto" and t.quant.target_ratio == 12
    assert validate(compose(["quant.bits_w=auto", "quant.budget_bits=20000"])).quant.budget_bits == 20000
    assert validate(compose(["analysis=sensitivity"])).analysis.widths == [2, 3, 4, 8]
    assert validate(compose([])).analysis is None


def test_qat_key_follows_the_budget(tmp_path):
    from qpexp.pipeline import Pipeline

    def keys(*o):
        return Pipeline(compose([*TINY, f"cache_dir={tmp_path}", *o]), tmp_path / "r").keys

    a, b = (
        keys("quant.bits_w=auto", "quant.target_ratio=10"),
        keys("quant.bits_w=auto", "quant.target_ratio=12"),
    )
    assert a["prune"] == b["prune"] and a["qat"] != b["qat"]
    assert keys("quant.bits_w=auto", "quant.budget_bits=9000")["qat"] != a["qat"]
    assert keys("analysis=sensitivity")["qat"] == keys()["qat"]  # the analysis changes no stage


def test_frontier_mp_sweep_definition():
    from qpexp.schema import validate
    from qpexp.sweepcheck import sweep_points

    cfg = compose(["sweep=frontier_mp"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweep.dir == "outputs/sweeps/frontier_mp"
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert "quant.bits_w" not in params and cfg.quant.bits_w == "auto"
    assert [float(r) for r in params["quant.target_ratio"]] == [12, 16, 20, 24, 28, 32]
    front = compose(["sweep=frontier"])  # the same training as the uniform frontier
    for key in (
        "quant.bits_a",
        "quant.granularity",
        "quant.range",
        "quant.narrow_range",
        "quant.epochs",
        "quant.lr",
        "prune.structure",
        "prune.steps",
        "prune.finetune_epochs",
        "prune.lr",
    ):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(front, key), key
    points = sweep_points(cfg)
    assert len(points) == 18
    for point in points:
        validate(compose(["sweep=frontier_mp", *point]))


# -- end to end -------------------------------------------------------------------------------------
def test_pipeline_auto_bits_within_budget(tmp_path):
    """bits_w=auto, PTQ (quant.epochs=0: the weights the widths were chosen on are the final ones):
    the record's per-layer widths are the assignment, and the per-layer sizes it records sum to the
    final size, which is the planned one and within the budget."""
    from test_pipeline import run_pipeline

    over = ["data.source.num_samples=1000", "quant.bits_w=auto", "quant.target_ratio=6", "quant.epochs=0"]
    rec, _ = run_pipeline(tmp_path, over)
    assert rec["status"] == "not_deployed"
    layers = [k.split("/")[1] for k in rec if k.startswith("layers/") and k.endswith("/bits_w")]
    assignment = dict(p.split(":") for p in rec["quant/assignment"].split(","))
    assert sorted(layers) == sorted(assignment)
    assert all(rec[f"layers/{n}/bits_w"] == int(b) and 2 <= int(b) <= 8 for n, b in assignment.items())
    parts = sum(rec[f"size/{n}/{p}"] for n in layers for p in ("weight_bits", "qparam_bits", "bias_bits"))
    assert parts + rec["size/other_bits"] == rec["final/size_bits"]
    budget = rec["quant/budget_bits"]
    assert budget == int(rec["dense/size_bits"] / 6)
    assert rec["quant/budget_feasible"] and rec["quant/budget_met"]
    assert rec["final/size_bits"] == rec["quant/planned_size_bits"] <= budget


def test_pipeline_sensitivity_analysis(tmp_path):
    from test_pipeline import run_pipeline

    rec, pipe = run_pipeline(tmp_path, ["data.source.num_samples=1000", "analysis=sensitivity"])
    assert rec["status"] == "not_deployed" and "qat/test_acc" not in rec  # analysis.stop: no QAT
    names = [v.name for v in layer_views(cnn1d((40,), 10))]
    for n in names:
        for s in ("w2", "w3", "w4", "w8", "p0.5", "p0.75", "p0.9"):
            assert 0 <= rec[f"sensitivity/{n}/{s}/val_acc"] <= 1 and rec[f"sensitivity/{n}/{s}/val_loss"] > 0
    assert rec["sensitivity/reference/val_acc"] == rec["prune/val_acc"]  # the pruned model, as it is
    png = tmp_path / "run" / "sensitivity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_wandb_gets_the_sensitivity_heatmap_and_the_widths(tmp_path):
    """One CLI run (W&B offline): analysis=sensitivity going on to QAT with bits_w=auto."""
    from conftest import read_record, run_cli, wandb_offline_runs

    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "logger=wandb",
        "data.source.num_samples=1000",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        "export.enabled=false",
        "analysis=sensitivity",
        "analysis.stop=false",
        "quant.bits_w=auto",
        "quant.target_ratio=5",
    ]
    run_cli(args, cwd=tmp_path)
    rec = read_record(run_dir)
    assert rec["status"] == "not_deployed" and "qat/test_acc" in rec and "sensitivity/fc/w2/val_acc" in rec
    (run,) = wandb_offline_runs(run_dir)
    for k in (
        "sensitivity/table",
        "sensitivity/heatmap_table",
        "layers/bits_w_table",
        "layers/bits_w_bar_table",
    ):
        assert any(h.startswith(k) for h in run["history_keys"]), (k, sorted(run["history_keys"]))
    assert run["summary"]["quant/assignment"] == rec["quant/assignment"]
