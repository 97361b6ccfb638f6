"""Issue 4: pruning criteria, structures, scopes, schedules, masks and the physically smaller model."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from conftest import TINY, compose
from torch import nn

from qpexp.core.accounting import count_params, model_macs, sparsity
from qpexp.core.prune import (
    MaskKeeper,
    PruneConfig,
    Target,
    ensure_masks,
    prunable_layers,
    prune_step,
    schedule,
)
from qpexp.core.prune.channel import (
    channel_prune_step,
    groups,
    physically_prune,
    pruned_channels,
    restore_structure,
)
from qpexp.core.prune.criteria.taylor import Taylor
from qpexp.core.prune.unstructured import keep_minimum
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.io import safe_torch_load
from qpexp.models import cnn1d, lenet5, mlp
from qpexp.pipeline import Pipeline
from qpexp.stages import PruneStage

X1D = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread (several intra-op threads only contend on a shared machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# both pruners share one signature (the example input is only needed to trace channels)
PRUNERS = {"unstructured": prune_step, "channel": channel_prune_step}


def cnn(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cnn1d((40,), 10, batchnorm=bn)


def weights_zero(model) -> dict[str, torch.Tensor]:
    return {n: (m.weight == 0) for n, m in prunable_layers(model)}


def n_weights(model) -> int:
    return sum(m.weight.numel() for _, m in prunable_layers(model))


def unmasked(model) -> int:
    """Parameters not masked out (every element of a parameter without a mask)."""
    total = 0
    for name, t in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        mask = getattr(model.get_submodule(owner), f"{pname}_mask", None)
        total += t.numel() if mask is None else int(mask.sum())
    return total


def masked_train(model, x, steps: int = 20, lr: float = 0.05, keep: bool = True, opt=None) -> None:
    """Adam steps (momentum and all) on random labels, masks re-applied after each step."""
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    keeper = MaskKeeper(model)
    y = torch.arange(len(x)) % 10
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if keep:
            keeper()


# -- channel arithmetic, written out ---------------------------------------------------------------
# kept weights per prunable layer when the hidden layers keep a[0], a[1], ... output channels: a
# channel takes its filter (row) and its input columns in the next layer
CHAIN = {
    # cnn1d on 40 samples: conv1 25x1x5, conv2 and conv3 25x25x3, fc 10 x (25 channels x 5 positions)
    "cnn1d": lambda a: [a[0] * 1 * 5, a[1] * a[0] * 3, a[2] * a[1] * 3, 10 * a[2] * 5],
    # mlp 40-100-100-10
    "mlp": lambda a: [a[0] * 40, a[1] * a[0], 10 * a[1]],
}
DENSE = {"cnn1d": (25, 25, 25), "mlp": (100, 100)}


def keep_min(n: int) -> int:
    """The most a layer of ``n`` weights may lose leaves it ``max(1, ceil(1% of n))`` (min_keep_frac)."""
    return max(1, -(-n // 100))


def kept_channels(model) -> list[int]:
    """Output channels with any nonzero weight, per prunable layer but the classifier."""
    return [
        int((m.weight != 0).reshape(m.weight.shape[0], -1).any(1).sum()) for _, m in prunable_layers(model)
    ][:-1]


def removable(arch: str, a: list[int]) -> bool:
    """Whether the kept channels ``a`` respect every layer's minimum (1 channel, keep_min weights)."""
    dense = CHAIN[arch](DENSE[arch])
    return min(a) >= 1 and all(w >= keep_min(n) for w, n in zip(CHAIN[arch](a), dense))


def channel_walk(arch: str, kept: list[int], order: list[int], goal: int) -> list[int]:
    """The channel pruner's rule, replayed on counts: remove channels one by one in ``order`` (a
    layer index each), skipping one that would leave a layer under its minimum, and stop at the
    removed-weight count closest to ``goal`` (ties: the smaller count)."""
    total = sum(CHAIN[arch](DENSE[arch]))
    kept = list(kept)
    before = total - sum(CHAIN[arch](kept))
    if before >= goal:
        return kept
    for layer in order:
        trial = kept.copy()
        trial[layer] -= 1
        if not removable(arch, trial):
            continue
        after = total - sum(CHAIN[arch](trial))
        if after >= goal:
            return trial if after - goal < goal - before else kept
        kept, before = trial, after
    return kept


def l1_global_order(model, pool: list[int]) -> list[int]:
    """The order in which scope=global removes the remaining channels of the layers ``pool``: each
    channel's group score (the L1 norm of its filter plus that of the next layer's input columns it
    feeds, Torch-Pruning's group importance) divided by the mean of its group's remaining channels,
    lowest first (ties: layer order, then channel order); one entry (the layer index) per channel."""
    layers = [m for _, m in prunable_layers(model)]
    keys = []
    for layer in pool:
        w = layers[layer].weight.detach()
        nxt = layers[layer + 1].weight.detach()
        s = w.abs().reshape(w.shape[0], -1).sum(1)
        if nxt.dim() == 2 and w.dim() > 2:  # through Flatten: each channel feeds L columns, channel-major
            s = s + nxt.abs().reshape(nxt.shape[0], w.shape[0], -1).sum((0, 2))
        else:
            s = s + nxt.abs().transpose(0, 1).reshape(w.shape[0], -1).sum(1)
        alive = [c for c in range(w.shape[0]) if bool((w[c] != 0).any())]
        mean = float(s[alive].mean())
        ranked = sorted(alive, key=lambda c: float(s[c]))
        keys += [(float(s[c]) / mean, layer, j) for j, c in enumerate(ranked)]
    return [layer for _, layer, _ in sorted(keys)]


def test_channel_walk_by_hand():
    """The replayed rule on cnn1d, by hand: one conv2 channel costs its 25x3 filter and its 25x3
    columns of conv3 (150 weights); conv1's costs 5 + 75 = 80, conv3's 75 + 50 = 125."""
    assert sum(CHAIN["cnn1d"](DENSE["cnn1d"])) == 5125 and sum(CHAIN["mlp"](DENSE["mlp"])) == 15000
    assert channel_walk("cnn1d", [25, 25, 25], [1], 100) == [25, 24, 25]  # 150 - 100 < 100 - 0
    assert channel_walk("cnn1d", [25, 25, 25], [1], 75) == [25, 25, 25]  # a tie: the smaller count
    # conv1: 80; conv2 then costs 24 x 3 + 75 = 147 (227); conv3 then 24 x 3 + 50 = 122 (349)
    assert channel_walk("cnn1d", [25, 25, 25], [0, 1, 2], 280) == [24, 24, 25]  # 349 - 280 >= 280 - 227
    assert channel_walk("cnn1d", [25, 25, 25], [0, 1, 2], 300) == [24, 24, 24]  # 349 - 300 < 300 - 227
    assert not removable("cnn1d", [2, 3, 3]) and removable("cnn1d", [3, 3, 3])  # conv2: 18 < 19


# -- the same masks as torch.nn.utils.prune ------------------------------------------------------
def test_l1_unstructured_and_global_unstructured_equal_torch():
    for scope, ratio in (("layer", 0.37), ("layer", 0.5), ("global", 0.61), ("global", 0.5)):
        ours, ref = cnn(), cnn()
        prune_step(ours, PruneConfig(ratio=ratio, scope=scope), ratio)
        layers = [m for _, m in prunable_layers(ref)]
        if scope == "layer":
            for m in layers:
                tprune.l1_unstructured(m, "weight", amount=ratio)
        else:
            tprune.global_unstructured([(m, "weight") for m in layers], tprune.L1Unstructured, amount=ratio)
        for (name, m), r in zip(prunable_layers(ours), layers):
            assert torch.equal(m.weight_mask, r.weight_mask), (scope, name)
            assert torch.equal(m.weight, r.weight), (scope, name)


def test_channel_ranking_is_group_importance():
    """Each channel is scored over its whole group (Torch-Pruning's group importance, sum reduction):
    the L2 norm of its filter plus the L2 norm of its input columns in the next layer, computed here
    by hand; per layer, the pruned filters are the lowest of those sums."""
    model = cnn(bn=True)
    ref = cnn(bn=True)
    channel_prune_step(model, PruneConfig(ratio=0.5, scope="layer", criterion="l2", structure="channel"), 0.5,
                       example=X1D[:1])  # fmt: skip
    nxt = {"conv1": ref.conv2.weight, "conv2": ref.conv3.weight, "conv3": ref.fc.weight.reshape(10, 25, -1)}
    checked = 0
    for g in groups(model, X1D[:1]):
        rows = ~g.root.weight_mask.reshape(g.n, -1).any(1)
        k = int(rows.sum())
        assert 0 < k < g.n
        w = ref.get_submodule(g.name).weight
        score = w.reshape(g.n, -1).norm(dim=1) + nxt[g.name].transpose(0, 1).reshape(g.n, -1).norm(dim=1)
        lowest = torch.zeros(g.n, dtype=torch.bool)
        lowest[score.argsort()[:k]] = True
        assert torch.equal(rows, lowest), g.name
        checked += 1
    assert checked == 3  # conv1..conv3; the classifier's outputs are never pruned


# -- schedules reach their targets exactly --------------------------------------------------------
@pytest.mark.parametrize("name", ["oneshot", "geometric", "linear", "agp"])
def test_schedule_reaches_each_target_exactly(name):
    targets = schedule(name, 0.8, 4)
    assert targets[-1] == 0.8 and targets == sorted(targets)
    if name == "geometric":  # each step removes the same fraction of what remains
        keep = [1 - t for t in [0.0, *targets]]
        assert all(math.isclose(keep[i + 1] / keep[i], 0.2 ** (1 / 4)) for i in range(4))
    if name == "agp":
        assert targets[0] == pytest.approx(0.8 * (1 - (1 - 1 / 4) ** 3))
    model = cnn()
    n = n_weights(model)
    before = weights_zero(model)
    for t in targets:
        prune_step(model, PruneConfig(ratio=0.8), t)
        zero = weights_zero(model)
        assert sum(int(z.sum()) for z in zero.values()) == round(t * n)
        assert all(bool(zero[k][before[k]].all()) for k in zero)  # masks only grow
        before = zero


def test_channel_schedule_reaches_target_as_closely_as_channels_allow():
    model = cnn(bn=True)
    n = n_weights(model)
    prev = weights_zero(model)
    for t in schedule("geometric", 0.75, 3):
        cfg = PruneConfig(ratio=0.75, structure="channel")
        want = channel_walk("cnn1d", kept_channels(model), l1_global_order(model, [0, 1, 2]), round(t * n))
        layers = channel_prune_step(model, cfg, t, example=X1D[:1])
        zero = weights_zero(model)
        removed = sum(int(z.sum()) for z in zero.values())
        assert kept_channels(model) == want
        assert [int(z.sum()) for z in zero.values()] == [
            d - k for d, k in zip(CHAIN["cnn1d"](DENSE["cnn1d"]), CHAIN["cnn1d"](want))
        ]
        assert abs(removed - round(t * n)) <= 150 / 2  # the dearest channel (conv2's) at most half over
        assert layers == {k: int(z.sum()) / z.numel() for k, z in zero.items()}  # reported = realized
        assert all(bool(zero[k][prev[k]].all()) for k in zero)
        prev = zero


def test_first_and_last_layer_own_ratio_total_still_reached():
    model = cnn()
    n = n_weights(model)
    prune_step(model, PruneConfig(ratio=0.6, first_ratio=0.0, last_ratio=0.3), 0.6)
    zero = weights_zero(model)
    assert int(zero["conv1"].sum()) == 0
    assert int(zero["fc"].sum()) == round(0.3 * zero["fc"].numel())
    assert sum(int(z.sum()) for z in zero.values()) == round(0.6 * n)  # the pool makes up the rest
    ch = cnn()
    # the pool (conv2, conv3) takes channels in the global order until the count is closest to the goal
    want = channel_walk("cnn1d", [25, 25, 25], l1_global_order(ch, [1, 2]), round(0.5 * n))
    channel_prune_step(ch, PruneConfig(ratio=0.5, first_ratio=0.0, structure="channel"), 0.5, example=X1D[:1])
    assert kept_channels(ch) == want and want[0] == 25  # no first-layer channel removed
    removed = sum(int(z.sum()) for z in weights_zero(ch).values())
    assert removed == n - sum(CHAIN["cnn1d"](want))
    assert abs(removed - round(0.5 * n)) <= 150 / 2


# -- scopes ------------------------------------------------------------------------------------------
def uneven_cnn() -> nn.Module:
    """Layers that differ: conv2 has 12 weak filters among 25, the classifier small weights."""
    model = cnn()
    with torch.no_grad():
        model.conv2.weight[:12] *= 0.05
        model.fc.weight *= 0.3
    return model


def test_global_and_layer_scope_differ():
    out, channels = {}, {}
    for structure in ("unstructured", "channel"):
        for scope in ("global", "layer"):
            model = uneven_cnn()
            cfg = PruneConfig(ratio=0.6, scope=scope, structure=structure)
            if structure == "channel":
                out[structure, scope] = channel_prune_step(model, cfg, 0.4, example=X1D[:1])
                channels[scope] = {g.name: len(pruned_channels(g)) for g in groups(model, X1D[:1])}
            else:
                out[structure, scope] = prune_step(model, cfg, 0.6)
    lay = out["unstructured", "layer"]
    n = dict(zip(lay, CHAIN["cnn1d"](DENSE["cnn1d"])))
    assert lay == {k: float(torch.tensor(round(0.6 * n[k]) / n[k])) for k in lay}  # round(0.6 n) each
    glob = out["unstructured", "global"]
    assert glob["fc"] > 0.8 and glob["conv1"] < 0.3  # one threshold: small weights go first
    # channels: layer scope removes the same fraction of every layer's filters; global takes the
    # weak conv2 filters first (they are weak relative to their layer's mean)
    lay, glob = out["channel", "layer"], out["channel", "global"]
    assert max(abs(glob[k] - lay[k]) for k in glob) > 0.1
    assert channels["global"]["conv2"] >= 12 and channels["layer"]["conv2"] <= 9
    assert max(channels["layer"].values()) - min(channels["layer"].values()) <= 1  # same fraction


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_no_layer_emptied_at_099(structure, scope):
    """0.99 asks for more than the per-layer minimum (1% of each layer, at least one weight; one
    channel) allows: unstructured pruning removes exactly ``min(round(0.99 N), N - sum of minimums)``
    (globally) or ``min(round(0.99 n), n - minimum)`` per layer; channel pruning removes every channel
    it can (no further channel is removable) and the counts follow from the channels kept."""
    for arch, build in (("cnn1d", lambda: cnn(bn=True)), ("mlp", lambda: mlp((40,), 10))):
        torch.manual_seed(0)
        model = build()
        cfg = PruneConfig(ratio=0.99, scope=scope, structure=structure, criterion="l1")
        PRUNERS[structure](model, cfg, 0.99, example=X1D[:1])
        for name, m in prunable_layers(model):
            nz = int((m.weight != 0).sum())
            assert nz >= keep_minimum(m.weight.numel(), cfg.min_keep_frac), name
            assert bool((m.weight != 0).reshape(m.weight.shape[0], -1).any(1).any()), name
        assert torch.isfinite(model(X1D)).all()
        n = [m.weight.numel() for _, m in prunable_layers(model)]
        zeros = [int((m.weight == 0).sum()) for _, m in prunable_layers(model)]
        if structure == "unstructured" and scope == "global":
            assert sum(zeros) == min(round(0.99 * sum(n)), sum(n) - sum(keep_min(k) for k in n))
            assert sum(zeros) == {"cnn1d": 5125 - (2 + 19 + 19 + 13), "mlp": 14850}[arch]  # by hand
        elif structure == "unstructured":
            assert zeros == [min(round(0.99 * k), k - keep_min(k)) for k in n]
        else:
            a = kept_channels(model)
            assert zeros == [d - k for d, k in zip(n, CHAIN[arch](a))]
            assert sum(zeros) < round(0.99 * sum(n))  # out of reach
            for i in range(len(a)):  # nothing left to remove
                assert not removable(arch, [c - (j == i) for j, c in enumerate(a)]), (a, i)
            if scope == "layer":  # the same count from every layer: 3 a^2 >= 19 weights, a^2 >= 100
                assert a == {"cnn1d": [3, 3, 3], "mlp": [10, 10]}[arch]


# -- physically smaller model ------------------------------------------------------------------------
MODELS = {
    "cnn1d_bn": (lambda: cnn(bn=True), X1D),
    "mlp": (lambda: mlp((40,), 10), X1D),
    "lenet5": (lambda: lenet5((1, 16, 16), 10, batchnorm=True), torch.randn(8, 1, 16, 16)),
}
CASES = [("cnn1d_bn", c) for c in ("l1", "l2", "taylor", "random", "fpgm")]
CASES += [("mlp", "l1"), ("lenet5", "l1"), ("lenet5", "taylor")]


@pytest.mark.parametrize("arch,criterion", CASES)
def test_physical_pruning_matches_masked_model(arch, criterion):
    build, x = MODELS[arch]
    torch.manual_seed(0)
    model = build()
    cfg = PruneConfig(ratio=0.5, structure="channel", criterion=criterion, scope="global")
    grads = None
    if criterion == "taylor":
        model.zero_grad()
        F.cross_entropy(model(x), torch.arange(len(x)) % 10).backward()
        grads = {n: [m.weight.grad.clone()] for n, m in prunable_layers(model)}
    channel_prune_step(model, cfg, 0.5, grads=grads, example=x[:1])
    masked_train(model, x, steps=5)  # masks kept through Adam; BN statistics move
    # every coupled parameter of a pruned channel is exactly zero, next-layer inputs included
    keep = unmasked(model)
    assert keep == sum(int((t != 0).sum()) for t in model.parameters())
    dense_macs = model_macs(model, x)["layers"]
    alive = {n: float((m.weight != 0).float().mean()) for n, m in prunable_layers(model)}
    model.eval()
    masked_logits = model(x)

    structure = physically_prune(model, x[:1])
    assert not any(b.endswith("_mask") for b, _ in model.named_buffers())
    assert (model(x) - masked_logits).abs().max() < 1e-5
    assert count_params(model)[0] == keep  # exactly the unmasked parameters remain
    macs = model_macs(model, x)["layers"]
    for name, m in dense_macs.items():
        assert macs[name] == round(m * alive[name]), name  # MACs drop with kept rows x kept columns
    assert sum(macs.values()) < sum(dense_macs.values())

    # restore_structure + load on a fresh full-size model reproduces it (through a weights_only file)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "structure": structure}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    fresh = build()
    restore_structure(fresh, saved["structure"], x[:1])
    fresh.load_state_dict(saved["model"])
    fresh.eval()
    assert torch.equal(fresh(x), model(x))


# -- Taylor by hand --------------------------------------------------------------------------------
def test_taylor_scores_match_hand_computation():
    """A linear layer y = W x with loss sum(y): dL/dW_ij = sum over the batch of x_j."""
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    batches = [torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]), torch.tensor([[2.0, -1.0, 1.0]])]
    layer = nn.Linear(3, 2, bias=False)
    layer.weight.data.copy_(w)
    grads = []
    for x in batches:
        layer.zero_grad()
        layer(x).sum().backward()
        grads.append(layer.weight.grad.clone())
    hand_g = [torch.tensor([[1.0, 3.0, 1.0]] * 2), torch.tensor([[2.0, -1.0, 1.0]] * 2)]
    assert all(torch.equal(a, b) for a, b in zip(grads, hand_g))
    t = Target("fc", layer.weight, grads)
    # elementwise: mean over batches of (g w)^2, or |g w|
    gw1 = torch.tensor([[1.0, -6.0, 0.5], [0.0, 9.0, -1.0]])
    gw2 = torch.tensor([[2.0, 2.0, 0.5], [0.0, -3.0, -1.0]])
    assert torch.allclose(Taylor("squared")(t), (gw1**2 + gw2**2) / 2)
    assert torch.allclose(Taylor("abs")(t), (gw1.abs() + gw2.abs()) / 2)
    # channel group (one output neuron): mean over batches of (sum over its weights of g w)^2
    row1, row2 = torch.tensor([-4.5, 8.0]), torch.tensor([4.5, -4.0])
    assert torch.allclose(Taylor("squared")(t, dim=0), (row1**2 + row2**2) / 2)
    assert torch.allclose(Taylor("abs")(t, dim=0), (row1.abs() + row2.abs()) / 2)


class FakeDM:
    def __init__(self, x, y, batch=4):
        self.x, self.y, self.batch = x, y, batch
        self.splits = {"val": (x, y)}

    def loader(self, split, shuffle=False):
        return [
            (self.x[i : i + self.batch], self.y[i : i + self.batch])
            for i in range(0, len(self.x), self.batch)
        ]


def fake_stage(model, cfg, **kw) -> PruneStage:
    stage = PruneStage(model, 10, prune=cfg, finetune_epochs=1, **kw)
    stage._trainer = SimpleNamespace(
        datamodule=FakeDM(X1D, torch.arange(16) % 10), current_epoch=0, should_stop=False, global_step=0
    )
    return stage


def test_stage_collects_taylor_gradients_per_batch():
    model = cnn()
    stage = fake_stage(model, PruneConfig(criterion="taylor", taylor_batches=3))
    grads = stage._grads()
    x, y = X1D, torch.arange(16) % 10
    for b in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[4 * b : 4 * b + 4]), y[4 * b : 4 * b + 4]).backward()
        for name, m in prunable_layers(model):
            assert torch.equal(grads[name][b], m.weight.grad)
    assert all(len(g) == 3 for g in grads.values())


# -- masks through training, QAT and checkpoints ------------------------------------------------------
@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_pruned_weights_stay_zero_through_adam_and_qat(structure):
    cfg = PruneConfig(ratio=0.6, structure=structure)
    runs, models = {}, {}
    for keep in (True, False):  # the same training, with the keeper and without it (the control)
        model = cnn(bn=True)
        # pruning in the middle of fine-tuning: Adam's momentum already moves every weight (a pruned
        # conv-BN-ReLU channel gets no gradient of its own; its momentum still revives it)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        masked_train(model, X1D, steps=3, opt=opt)
        PRUNERS[structure](model, cfg, 0.6, example=X1D[:1])
        masks = {n: b.clone() for n, b in model.named_buffers() if n.endswith("_mask")}
        masked_train(model, X1D, steps=15, keep=keep, opt=opt)
        params = dict(model.named_parameters())
        runs[keep] = {k: params[k[: -len("_mask")]][m == 0] for k, m in masks.items()}
        models[keep] = model
    assert runs[True].keys() == runs[False].keys() and runs[True]
    for key, pruned in runs[True].items():
        assert torch.equal(pruned, torch.zeros(len(pruned))), key  # the keeper holds them at zero
        assert bool((runs[False][key] != 0).all()), key  # without it every pruned entry comes back
    model = models[True]
    # QAT: wrap, fold BN, fine-tune; masked weights and their fake-quantized values stay zero
    quantize_(model, QuantConfig(QuantSpec(4), QuantSpec(8, granularity="tensor", symmetric=False)))
    masked_train(model, X1D, steps=10, lr=0.05)
    for name, m in model.named_modules():
        if hasattr(m, "wq") and getattr(m.layer, "weight_mask", None) is not None:
            zero = m.layer.weight_mask == 0
            assert torch.equal(m.layer.weight[zero], torch.zeros(int(zero.sum()))), name
            m.wq.eval()
            assert torch.equal(m.wq(m.layer.weight)[zero], torch.zeros(int(zero.sum()))), name


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_masked_checkpoint_saves_and_loads(structure, tmp_path):
    model = cnn(bn=True)
    cfg = PruneConfig(ratio=0.5, structure=structure)
    PRUNERS[structure](model, cfg, 0.5, example=X1D[:1])
    masked_train(model, X1D, steps=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh = cnn(bn=True, seed=5)
    ensure_masks(fresh, state)
    fresh.load_state_dict(state)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    masked_train(fresh, X1D, steps=3)  # the loaded masks are kept by a new MaskKeeper
    for n, b in fresh.named_buffers():
        if n.endswith("_mask"):
            p = fresh.get_parameter(n[: -len("_mask")])
            assert torch.equal(p[b == 0], torch.zeros(int((b == 0).sum()))), n


# -- criteria ----------------------------------------------------------------------------------------
def test_random_criterion_differs_from_l1_and_is_seeded():
    masks = {}
    for crit, seed in (("l1", 0), ("random", 0), ("random", 0), ("random", 1)):
        model = cnn()
        prune_step(model, PruneConfig(ratio=0.5, criterion=crit, seed=seed), 0.5)
        masks[crit, seed, len(masks)] = torch.cat(
            [m.weight_mask.reshape(-1) for _, m in prunable_layers(model)]
        )
    l1, r0, r0b, r1 = masks.values()
    assert not torch.equal(l1, r0) and not torch.equal(r0, r1)
    assert torch.equal(r0, r0b)
    assert int((l1 == 0).sum()) == int((r0 == 0).sum())  # same count, other weights


# -- the accuracy budget -----------------------------------------------------------------------------
def _drive(stage: PruneStage, vals: list[float]) -> None:
    for epoch, v in enumerate(vals):
        stage._trainer.current_epoch = epoch
        stage.on_train_epoch_start()
        stage.epoch_end(v)
        if stage._trainer.should_stop:
            break
    stage.select_best()


def test_max_acc_drop_stops_and_keeps_last_step_within_budget():
    model = cnn()
    cfg = PruneConfig(ratio=0.9, schedule="geometric", steps=3)
    stage = fake_stage(model, cfg, max_acc_drop=0.05, reference_val=0.9)
    masks_after = {}
    orig = stage.prune_to

    def prune_to(step):
        orig(step)
        masks_after[step] = {n: b.clone() for n, b in model.named_buffers()}

    stage.prune_to = prune_to
    _drive(stage, [0.89, 0.86, 0.80])  # step 3 falls 0.10 below the reference
    assert stage._trainer.should_stop
    meta = stage.stage_meta()
    assert meta["stopped_at_step"] == 2 and meta["selected_target"] == stage.targets[1]
    assert "step 3" in meta["stop_reason"] and "0.8000" in meta["stop_reason"]
    for n, b in model.named_buffers():
        assert torch.equal(b, masks_after[1][n])  # step 2's masks back
    assert sparsity(model) == round(stage.targets[1] * n_weights(model)) / n_weights(model)
    assert stage.best_val == 0.86


def test_max_acc_drop_first_step_over_budget_keeps_unpruned_model():
    model = cnn()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    stage = fake_stage(model, PruneConfig(ratio=0.9, steps=3), max_acc_drop=0.01, reference_val=0.9)
    _drive(stage, [0.5, 0.9, 0.9])
    assert stage.stage_meta()["stopped_at_step"] == 0
    assert model.state_dict().keys() == dense.keys()  # masks gone
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_rewind_resets_surviving_weights():
    model = cnn()
    init = {k: v.clone() for k, v in cnn(seed=7).state_dict().items()}
    stage = fake_stage(model, PruneConfig(ratio=0.5, steps=1, schedule="oneshot"), rewind_state=init)
    stage.on_train_epoch_start()
    for name, m in prunable_layers(model):
        keep = m.weight_mask.bool()
        assert torch.equal(m.weight[keep], init[f"{name}.weight"][keep])
        assert bool((m.weight[~keep] == 0).all())


# -- end to end --------------------------------------------------------------------------------------
def run_pipeline(tmp_path: Path, overrides: list[str], run: str = "run") -> dict:
    cfg = compose([*TINY, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false", *overrides])
    return Pipeline(cfg, tmp_path / run).run()


def test_channel_end_to_end_smaller_and_cache_restores_structure(tmp_path):
    over = ["prune.structure=channel", "prune.ratio=0.6", "quant.bits_w=4"]
    rec = run_pipeline(tmp_path, over)
    assert rec["final/params"] < 0.6 * rec["dense/params"]
    assert rec["final/macs"] < 0.6 * rec["dense/macs"]
    assert rec["final/sparsity"] >= rec["prune/realized_ratio"]
    assert rec["prune/stopped_at_step"] == rec["prune/steps_planned"] == 2
    pruned = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")
    assert set(pruned["structure"]) == {"conv1", "conv2", "conv3"}
    # the realized ratio is what the kept channels leave, within half a channel of round(0.6 N): a
    # channel costs at most 150 weights (conv2's filter and conv3's columns)
    kept = [len(pruned["structure"][f"conv{i}"]) for i in (1, 2, 3)]
    removed = 5125 - sum(CHAIN["cnn1d"](kept))
    assert rec["prune/realized_ratio"] == pytest.approx(removed / 5125, rel=1e-12)
    assert abs(removed - round(0.6 * 5125)) <= 150 / 2
    weights = [pruned["model"][f"{n}.weight"] for n in ("conv1", "conv2", "conv3", "fc")]
    assert [w.numel() for w in weights] == CHAIN["cnn1d"](kept)  # physically that much smaller
    assert not any(k.endswith("_mask") for k in pruned["model"])
    again = run_pipeline(tmp_path, over, run="run2")  # cache hit: restore_structure, then load
    assert again["cache/prune_hit"] and again["cache/qat_hit"]
    for k in ("prune/test_acc", "final/test_acc", "final/params", "final/macs", "final/size_bits"):
        assert again[k] == rec[k], k


def test_agp_end_to_end_zeros_survive_qat(tmp_path):
    rec = run_pipeline(
        tmp_path, ["prune.schedule=agp", "prune.agp_dt=5", "prune.ratio=0.7", "quant.bits_w=4"]
    )
    assert rec["prune/stopped_at_step"] == 2 and rec["prune/realized_ratio"] == round(0.7 * 5125) / 5125
    pruned = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")["model"]
    final = safe_torch_load(Path(rec["artifacts/qat"]) / "model.pt")["model"]
    for key, mask in pruned.items():
        if key.endswith("weight_mask"):
            w = final[key.replace(".weight_mask", ".layer.weight")]
            assert torch.equal(w[mask == 0], torch.zeros(int((mask == 0).sum()))), key


def test_budget_end_to_end_record(tmp_path):
    """A budget no pruned step meets: 99% of the weights in one shot, no real fine-tuning (lr 1e-9
    leaves them where pruning put them; val accuracy falls to near chance) and max_acc_drop=0. The
    stage stops at step 0 and keeps the baseline model itself, bit for bit, without masks."""
    over = ["prune.ratio=0.99", "prune.schedule=oneshot", "prune.lr=1e-9", "prune.max_acc_drop=0.0"]
    rec = run_pipeline(tmp_path, [*over, "quant.bits_w=32"])
    assert rec["prune/stop_reason"].startswith("accuracy budget: step 1 reached val acc")
    assert f"below {rec['baseline/val_acc']:.4f}" in rec["prune/stop_reason"]
    assert rec["prune/stopped_at_step"] == 0 and rec["prune/steps_planned"] == 1
    base = safe_torch_load(Path(rec["artifacts/baseline"]) / "model.pt")["model"]
    pruned = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")["model"]
    assert pruned.keys() == base.keys()  # no masks left
    assert all(torch.equal(pruned[k], base[k]) for k in base)
    assert sum(int((v == 0).sum()) for k, v in pruned.items() if k.endswith(".weight")) == 0
    assert rec["final/sparsity"] == 0
    assert (
        rec["prune/test_acc"] == rec["baseline/test_acc"] and rec["prune/val_acc"] == rec["baseline/val_acc"]
    )


def test_fpgm_needs_channel_structure():
    with pytest.raises(ValueError, match="fpgm"):
        PruneConfig(criterion="fpgm").validate()
    PruneConfig(criterion="fpgm", structure="channel").validate()
