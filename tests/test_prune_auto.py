"""prune.scope=auto: per-layer fractions planned from the measured validation loss, exact totals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose
from torch import nn

from qpexp.core.prune import PruneConfig, prune_step
from qpexp.core.prune.auto import greedy_plan
from qpexp.core.prune.channel import channel_prune_step
from qpexp.io import safe_torch_load
from qpexp.pipeline import Pipeline


def test_greedy_plan_takes_the_cheapest_loss_per_weight_first():
    """Hand-computed: layer a has 100 weights and each tenth adds 1.0 to the loss (0.1 per weight);
    layer b has 10 weights and each tenth adds 0.5 (0.5 per weight). 35 weights: four tenths of a
    (a tenth overshoots rather than falls short). 95 weights: a's nine tenths (90), then five of b's."""
    size = {"a": 100, "b": 10}
    per_tenth = {"a": 1.0, "b": 0.5}

    def run(goal):
        at = {"a": 0.0, "b": 0.0}
        calls = []

        def trial(name, f):
            before = at[name]
            gone = round(f * size[name]) - round(before * size[name])
            at[name] = f
            calls.append((name, f))

            def undo():
                at[name] = before

            return gone, undo

        def loss():
            return sum(per_tenth[n] * round(at[n] * 10) for n in at)

        return greedy_plan(["a", "b"], {"a": 0.0, "b": 0.0}, trial, loss, goal), at

    plan, applied = run(35)
    assert plan == {"a": 0.4, "b": 0.0} and applied == plan  # the plan stays applied
    plan, _ = run(95)
    assert plan == {"a": 0.9, "b": 0.5}
    plan, _ = run(10_000)  # unreachable: every layer at its last tenth
    assert plan == {"a": 0.9, "b": 0.9}


class TwoBranches(nn.Module):
    """``a(x) + 1e-3 b(x)``: b hardly matters to the output, a does; both have 64 weights."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 4, bias=False)
        self.b = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.a(x) + 1e-3 * self.b(x)


def _data(model, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.in_shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return [(x, y)]


def test_unstructured_auto_prunes_the_insensitive_layer_and_hits_the_exact_count():
    torch.manual_seed(0)
    model = TwoBranches()
    model.in_shape = (16,)
    batches = _data(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    auto = prune_step(model, PruneConfig(ratio=0.45, scope="auto"), 0.45, batches=batches)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros == round(0.45 * 128)  # 58, counted on the model
    assert auto["b"] == pytest.approx(58 / 64) and auto["a"] == 0.0  # b's nine tenths hold the count
    for n, p in model.named_parameters():  # planning restored every weight: kept ones unchanged
        kept = p != 0
        assert torch.equal(p[kept], original[n][kept])
    # one global magnitude threshold splits the cut between the two layers instead
    other = TwoBranches()
    other.load_state_dict({n: v for n, v in original.items()})
    glob = prune_step(other, PruneConfig(ratio=0.45, scope="global"), 0.45)
    assert glob["a"] > 0.2 and glob["b"] < 0.7


class SummedBranches(nn.Module):
    """Two conv branches, each with its own classifier, summed; branch b scaled by 1e-3."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 8, 3, padding=1)
        self.b = nn.Conv1d(1, 8, 3, padding=1)
        self.fa = nn.Linear(8 * 12, 3)
        self.fb = nn.Linear(8 * 12, 3)

    def forward(self, x):
        x = x.unsqueeze(1)
        return self.fa(torch.relu(self.a(x)).flatten(1)) + 1e-3 * self.fb(torch.relu(self.b(x)).flatten(1))


def test_channel_auto_removes_the_insensitive_branchs_channels():
    torch.manual_seed(0)
    model = SummedBranches()
    model.in_shape = (12,)
    batches = _data(model)
    x = batches[0][0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = PruneConfig(ratio=0.3, scope="auto", structure="channel")
    channel_prune_step(model, cfg, 0.3, example=x[:1], batches=batches)
    dead = {n: int((getattr(model, n).weight_mask.reshape(8, -1).sum(1) == 0).sum()) for n in ("a", "b")}
    # a channel removes 3 conv weights and 12 x 3 classifier weights (39); 30% of the 2 x (24 + 288)
    # weights is 187.2: the closest whole number of channels is 5 (195), all from branch b
    assert dead == {"a": 0, "b": 5}
    kept = {n: int(getattr(model, n).weight_mask.sum()) for n in ("a", "b", "fa", "fb")}
    assert 2 * (24 + 288) - sum(kept.values()) == 5 * 39
    for n in ("a.weight", "fa.weight"):  # planning restored the weights it tried
        assert torch.equal(model.get_parameter(n), before[n])
    # the same step with one fraction per layer cuts branch a as deep as branch b
    other = SummedBranches()
    other.load_state_dict(before)
    channel_prune_step(other, PruneConfig(ratio=0.3, scope="layer", structure="channel"), 0.3, example=x[:1])
    assert int((other.a.weight_mask.reshape(8, -1).sum(1) == 0).sum()) >= 2


def test_auto_without_validation_batches_is_refused_naming_the_setting():
    model = TwoBranches()
    with pytest.raises(ValueError, match="prune.scope=auto"):
        prune_step(model, PruneConfig(ratio=0.5, scope="auto"), 0.5)


def test_auto_batches_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="prune.auto_batches"):
        PruneConfig(ratio=0.5, scope="auto", auto_batches=0).validate()


def test_pipeline_with_scope_auto_prunes_exactly_the_ratio(tmp_path):
    """End to end (the stage hands its validation batches to the pruner): the pruned model saved in
    the cache has exactly round(0.6 N) zero weights, as the record says."""
    over = ["prune.scope=auto", "prune.ratio=0.6", "prune.auto_batches=1", "quant.bits_w=32"]
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false", *over])
    rec = Pipeline(cfg, tmp_path / "run").run()
    state = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")["model"]
    weights = [state[f"{n}.weight"] for n in ("conv1", "conv2", "conv3", "fc")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * 5125) and rec["prune/realized_ratio"] == zeros / 5125
