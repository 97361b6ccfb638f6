"""Issue 10: built-in architectures, any model through ``model._target_``, and pruning of real
architectures (every weight matrix, coupled groups, depthwise/grouped convs, attention heads).

References are independent of the code under test: parameter counts by hand from the papers'
layer lists, MACs from ``torch.utils.flop_counter.FlopCounterMode``, group scores from what
Torch-Pruning itself removes, masked logits from the masked model, torch's own
``nn.MultiheadAttention`` and ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from conftest import ROOT, compose, run_cli
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import qpexp.models as M
from qpexp.core.accounting import count_params, model_macs, size_bits, sparsity
from qpexp.core.prune import MaskKeeper, PruneConfig, prunable_weights, prune_step
from qpexp.core.prune.attention import HeadPrunedAttention
from qpexp.core.prune.channel import (
    ChannelPruningError,
    analyse,
    channel_prune_step,
    dry_run,
    group_scores,
    physically_prune,
    restore_structure,
)
from qpexp.core.prune.criteria.magnitude import L1
from qpexp.pipeline import Pipeline
from qpexp.schema import ConfigError

# tiny widths: every built-in model at a size that trains in a second or two on one core
TINY_MODEL = {
    "resnet20": {"width": 0.25},
    "resnet32": {"width": 0.125},
    "resnet56": {"width": 0.125},
    "vgg11": {"width": 0.0625},
    "vgg16": {"width": 0.0625},
    "mobilenetv2": {"width": 0.25, "last_channel": 32},
    "transformer": {"dim": 16, "depth": 1, "heads": 2},
}
ARCHS = list(TINY_MODEL)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def build(name: str, shape, classes: int = 10, seed: int = 0, **over) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(M, name)(shape, classes, **{**TINY_MODEL[name], **over})


def flop_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one sample by FlopCounterMode (the math SDPA kernel, so attention matmuls are seen)."""
    was = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x[:1])
    model.train(was)
    return fc.get_total_flops() // 2


# -- the models ---------------------------------------------------------------------------------------
def conv_bn(cin, cout, taps=9, bias=False):
    return taps * cin * cout + (cout if bias else 0) + 2 * cout


def resnet_params(depth: int, cin=3, classes=10, taps=9) -> int:
    n, total, c = (depth - 2) // 6, conv_bn(cin, 16, taps), 16
    for stage, cout in enumerate((16, 32, 64)):
        for j in range(n):
            total += conv_bn(c, cout, taps) + conv_bn(cout, cout, taps)
            if stage > 0 and j == 0:
                total += conv_bn(c, cout, taps=1)  # option-B projection
            c = cout
    return total + 64 * classes + classes


def vgg_params(cfg, cin=3, classes=10) -> int:
    total = 0
    for v in cfg:
        if v != "M":
            total += conv_bn(cin, v, bias=True)
            cin = v
    return total + 512 * 512 + 512 + 2 * 512 + 512 * classes + classes


def mobilenetv2_params(cin=3, classes=10) -> int:
    total, c = conv_bn(cin, 32), 32
    for t, cout, n, _ in [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                          (6, 160, 3, 2), (6, 320, 1, 1)]:  # fmt: skip
        for _ in range(n):
            h = c * t
            total += (conv_bn(c, h, taps=1) if t != 1 else 0) + 9 * h + 2 * h + conv_bn(h, cout, taps=1)
            c = cout
    return total + conv_bn(320, 1280, taps=1) + 1280 * classes + classes


def transformer_params(cin, patch_numel, tokens, dim=64, depth=4, mlp=128, classes=10) -> int:
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return (
        cin * patch_numel * dim
        + dim
        + dim
        + (tokens + 1) * dim
        + depth * block
        + 2 * dim
        + dim * classes
        + classes
    )


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


@pytest.mark.parametrize(
    "name,shape,params",
    [
        ("resnet20", (3, 32, 32), resnet_params(20)),
        ("resnet32", (3, 32, 32), resnet_params(32)),
        ("resnet56", (3, 32, 32), resnet_params(56)),
        ("resnet20", (40,), resnet_params(20, cin=1, taps=3)),
        ("vgg11", (3, 32, 32), vgg_params(VGG11)),
        ("vgg16", (3, 32, 32), vgg_params(VGG16)),
        ("mobilenetv2", (3, 32, 32), mobilenetv2_params()),
        ("transformer", (3, 32, 32), transformer_params(3, 16, 64)),
        ("transformer", (40,), transformer_params(1, 4, 10)),
    ],
)
def test_full_size_params_by_hand_and_macs_by_flop_counter(name, shape, params):
    model = getattr(M, name)(shape, 10)
    assert count_params(model)[0] == params
    x = torch.randn(1, *shape)
    assert model_macs(model, x)["macs"] == flop_macs(model, x)


def test_paper_sizes():
    """The published sizes: ResNet-20 0.27M, VGG-16 15.0M parameters and 313M MACs (Li et al. 2017),
    MobileNetV2 (CIFAR) 2.2M."""
    x = torch.randn(1, 3, 32, 32)
    assert round(resnet_params(20) / 1e6, 2) == 0.27
    vgg = M.vgg16((3, 32, 32), 10)
    assert round(count_params(vgg)[0] / 1e6, 1) == 15.0 and round(flop_macs(vgg, x) / 1e6) == 313
    assert round(mobilenetv2_params() / 1e6, 1) == 2.2


@pytest.mark.parametrize("name", ARCHS)
def test_sequences_and_images_any_class_count(name):
    for shape, conv in (
        ((40,), nn.Conv1d),
        ((2, 40), nn.Conv1d),
        ((3, 16, 16), nn.Conv2d),
        ((1, 8, 8), nn.Conv2d),
    ):
        model = build(name, shape, classes=7).eval()
        assert model(torch.randn(3, *shape)).shape == (3, 7)
        convs = {type(m) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
        assert convs == {conv}, (name, shape)
    with pytest.raises(ValueError, match=f"model={name}"):
        getattr(M, name)((2, 3, 4, 5), 10)


def test_builtin_models_importable_from_qpexp_models():
    from qpexp.models import cnn1d, lenet5, lenet300, mlp, resnet20, transformer  # noqa: F401

    assert (
        resnet20.__module__ == "qpexp.models.resnet" and transformer.__module__ == "qpexp.models.transformer"
    )


# -- channel removal equals the masked model, for every built-in model ---------------------------------
def perturb_bn(model: nn.Module) -> None:
    """BatchNorm statistics and affine parameters away from their identity initialisation."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def masked_train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    keep = MaskKeeper(model)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(len(x)) % 10).backward()
        opt.step()
        keep()


def unmasked(model: nn.Module) -> int:
    """Parameters not masked out: every element of a parameter without a mask, the ones of a mask."""
    total = 0
    for name, t in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        mask = getattr(model.get_submodule(owner), f"{pname}_mask", None)
        total += t.numel() if mask is None else int(mask.sum())
    return total


@pytest.mark.parametrize("shape", [(3, 16, 16), (40,)])
@pytest.mark.parametrize("name", ARCHS)
def test_channel_removal_equals_masked_model(name, shape):
    model = build(name, shape)
    perturb_bn(model)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
    channel_prune_step(model, PruneConfig(ratio=0.5, structure="channel", scope="global"), 0.5, example=x[:1])
    assert sparsity(model) > 0.3
    masked_train(model, x)
    keep = unmasked(model)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    structure = physically_prune(model, x[:1])
    with torch.no_grad():
        assert (model(x) - masked).abs().max() < 1e-5
    assert count_params(model)[0] == keep  # exactly the unmasked parameters remain
    assert model_macs(model, x)["macs"] == flop_macs(model, x)
    if name == "transformer":  # heads were removed: the attention became a HeadPrunedAttention
        assert any(isinstance(m, HeadPrunedAttention) for m in model.modules())
    fresh = build(name, shape, seed=7)  # restore_structure + load reproduces it on a fresh model
    restore_structure(fresh, structure, x[:1])
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# -- group importance ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_group_score_sums_every_coupled_weight(name):
    """For L1, a channel's group score is the L1 mass of every conv/linear weight its removal takes
    away: measured by letting Torch-Pruning itself remove that one channel from a copy."""
    import torch_pruning as tp

    model = build(name, (3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    plan = analyse(model, x)
    residual = 0
    for g in plan.groups[:6]:
        scores = group_scores(g, L1())
        layers = {w for w, *_ in g.scored}
        dims = {}
        for _, m, _, dim, *_ in g.scored:
            dims.setdefault(m, set()).add(dim)
        both = [m for m, d in dims.items() if d == {0, 1}]
        residual += len([n for n in layers if n.endswith("conv2") or "project" in n]) > 1
        for c in (0, g.n - 1):
            trial = copy.deepcopy(model)
            mass = sum(float(getattr(m, p).abs().sum()) for _, m, p in prunable_weights(trial))
            dg = tp.DependencyGraph().build_dependency(trial, example_inputs=x)
            root = trial.get_submodule(g.name)
            dg.get_pruning_group(root, tp.prune_conv_out_channels, [c]).prune()
            left = sum(float(getattr(m, p).abs().sum()) for _, m, p in prunable_weights(trial))
            # a weight whose rows and columns are both in the group (a MobileNet t=1 block) scores both
            # slices: their shared element w[c, c] counts twice
            twice = sum(float(m.weight[c, c].abs().sum()) for m in both)
            assert float(scores[c]) == pytest.approx(mass - left + twice, rel=1e-4), (g.name, c)
        assert len(layers) >= 2  # the root and at least its consumer
    if name == "resnet20":
        assert residual >= 1  # a residual stream: several blocks' conv2 rows in one group


def test_grouped_conv_units_and_depthwise():
    from user_models import Grouped

    model = Grouped()
    plan = analyse(model, torch.randn(1, 40))
    units = {g.name: g.units for g in plan.groups}
    assert units["a"] == [[p, p + 4, p + 8, p + 12] for p in range(4)]  # one channel of each conv group
    assert all(len(u) == 1 for u in units["c"])
    x = torch.randn(6, 40)
    channel_prune_step(model, PruneConfig(ratio=0.4, structure="channel"), 0.4, example=x[:1])
    model.eval()
    masked = model(x)
    physically_prune(model, x[:1])
    assert (model(x) - masked).abs().max() < 1e-5
    assert model.b.groups == 4 and model.b.in_channels % 4 == 0 and model.b.out_channels % 4 == 0


# -- attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    same = HeadPrunedAttention.from_attention(mha, [0, 1, 2, 3]).eval()
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    for args in ((q, q, q), (q, kv, kv)):
        kw = {"key_padding_mask": pad} if args[1] is kv else {}
        a, wa = mha(*args, **kw)
        b, wb = same(*args, **kw)
        assert (a - b).abs().max() < 1e-5 and (wa - wb).abs().max() < 1e-6
    # removing head 2 after masking it: the same outputs as the masked nn.MultiheadAttention
    with torch.no_grad():
        rows = torch.arange(8, 12)
        mha.in_proj_weight[torch.cat([rows, rows + 16, rows + 32])] = 0
        mha.in_proj_bias[torch.cat([rows, rows + 16, rows + 32])] = 0
        mha.out_proj.weight[:, rows] = 0
    three = HeadPrunedAttention.from_attention(mha, [0, 1, 3]).eval()
    assert (mha(q, q, q)[0] - three(q, q, q)[0]).abs().max() < 1e-5
    assert three.q_proj.weight.shape == (12, 16) and three.out_proj.weight.shape == (16, 12)


def test_unstructured_covers_in_proj_weight_like_torch_global_unstructured():
    """in_proj_weight (a raw nn.Parameter, 3E x E) is pruned and counted like every weight matrix:
    the masks equal torch.nn.utils.prune.global_unstructured over the same tensors."""
    ours, ref = (
        build("transformer", (40,), dim=32, depth=2, heads=4),
        build("transformer", (40,), dim=32, depth=2, heads=4),
    )
    prune_step(ours, PruneConfig(ratio=0.5, scope="global"), 0.5)
    params = [(m, p) for _, m, p in prunable_weights(ref)]
    assert sum(p == "in_proj_weight" for _, p in params) == 2
    tprune.global_unstructured(params, tprune.L1Unstructured, amount=0.5)
    for (n, m, p), (rm, rp) in zip(prunable_weights(ours), params):
        assert torch.equal(getattr(m, f"{p}_mask"), getattr(rm, f"{rp}_mask")), n
    attn = ours.blocks[0].attn
    assert "in_proj_weight_mask" in dict(attn.named_buffers())
    in_proj_zero = int((attn.in_proj_weight == 0).sum())
    assert in_proj_zero > 0.2 * attn.in_proj_weight.numel()
    # counts: every weight matrix, by hand
    mats = [getattr(m, p) for _, m, p in prunable_weights(ours)]
    assert sparsity(ours) == sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats) == 0.5
    masked_train(ours, torch.randn(8, 40), steps=3)
    assert int((attn.in_proj_weight == 0).sum()) == in_proj_zero  # re-applied after each step
    rows = size_bits(ours, detail=True)[1]
    assert rows["blocks.0.attn.in_proj_weight"]["format"] != "float"  # stored as a pruned tensor


# -- constructions -----------------------------------------------------------------------------------
def test_slices_are_left_unpruned_and_removal_does_not_crash():
    from user_models import SliceCat

    model = SliceCat()
    x = torch.randn(8, 40)
    frozen = dry_run(copy.deepcopy(model), x[:1])
    assert "slice" in frozen["conv"]
    channel_prune_step(model, PruneConfig(ratio=0.5, structure="channel"), 0.5, example=x[:1])
    masked_train(model, x)  # the crash came after fine-tuning
    model.eval()
    masked = model(x)
    physically_prune(model, x[:1])
    assert (model(x) - masked).abs().max() < 1e-5 and model.mix.out_channels < 16


def test_unprunable_construction_refused_naming_the_module():
    from user_models import ChannelMean

    with pytest.raises(ChannelPruningError, match="'stem'"):
        dry_run(ChannelMean(), torch.randn(1, 40))


# -- any model through model._target_, end to end ------------------------------------------------------
def run(tmp_path, overrides: list[str]) -> dict:
    cfg = compose([
        "baseline.epochs=1", "prune.steps=2", "prune.finetune_epochs=1", "quant=none", "logger=none",
        "export.enabled=false", f"cache_dir={tmp_path / 'cache'}", *overrides,
    ])  # fmt: skip
    return Pipeline(cfg, tmp_path / "run").run()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from test_vision import cifar_fixture

    root = cifar_fixture(tmp_path_factory.mktemp("cifar"), n=20)
    return ["data=vision", "data.name=cifar10", f"data.path={root}"]


DATA = {
    "mnist1d": ["data=mnist1d", "data.source.num_samples=600"],
    "digits": ["data=digits"],
}
STRUCTURES = {
    "unstructured": ["prune=default", "prune.scope=global"],
    "channel": ["prune=channel", "prune.scope=global"],
}
# each model on two of the three datasets, each dataset with both structures
DATA_OF = {
    "resnet20": ("cifar", "mnist1d"),
    "resnet32": ("mnist1d", "digits"),
    "resnet56": ("mnist1d", "cifar"),
    "vgg11": ("digits", "mnist1d"),
    "vgg16": ("mnist1d", "digits"),
    "mobilenetv2": ("cifar", "mnist1d"),
    "transformer": ("digits", "mnist1d"),
}
MATRIX = [(a, s, DATA_OF[a][i]) for a in ARCHS for i, s in enumerate(STRUCTURES)]


@pytest.mark.parametrize("arch,structure,data", MATRIX)
def test_every_model_prunes_end_to_end(tmp_path, cifar, arch, structure, data):
    over = [f"model={arch}", *(f"model.{k}={v}" for k, v in TINY_MODEL[arch].items())]
    rec = run(tmp_path, [*over, *(cifar if data == "cifar" else DATA[data]), *STRUCTURES[structure]])
    assert rec["status"] == "not_deployed"
    if structure == "unstructured":  # every weight matrix, attention projections included
        assert rec["final/sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert rec["final/params"] == rec["dense/params"]
    else:
        assert abs(rec["final/sparsity"] - 0.5) < 0.1
        assert rec["final/params"] < 0.75 * rec["dense/params"] and rec["final/macs"] < rec["dense/macs"]
        if arch == "transformer":  # the residual stream goes through LayerNorm: left unpruned, said so
            assert any("LayerNorm" in why for why in rec["prune/frozen"].values())
            # the cached pruned model (heads removed) is rebuilt from its structure: same record
            again = run(tmp_path, [*over, *DATA[data], *STRUCTURES[structure]])
            assert again["cache/prune_hit"] and again["final/test_acc"] == rec["final/test_acc"]
            assert again["final/params"] == rec["final/params"]


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_user_class_through_target_every_stage(tmp_path, structure):
    """A residual block with a depthwise conv, LayerNorm and attention, defined in a test module:
    baseline, pruning and 4-bit QAT (8-bit activations)."""
    rec = run(tmp_path, ["model=custom", "model._target_=user_models.UserNet", "+model.width=8", "quant=default",
                         "quant.epochs=1", "quant.calib_batches=2", *DATA["mnist1d"], *STRUCTURES[structure]])  # fmt: skip
    assert rec["status"] == "not_deployed" and rec["final/sparsity"] > 0.4 and rec["final/bits_w"] == 4
    assert rec["final/test_acc"] == rec["qat/test_acc"]
    if structure == "channel":  # heads and the MLP width removed; the LayerNorm-coupled stream kept
        assert rec["final/params"] < rec["dense/params"] and rec["prune/frozen"]


def test_plain_function_through_target_with_its_own_keys(tmp_path):
    rec = run(tmp_path, ["model=custom", "model._target_=user_models.user_net_fn", "+model.width=4",
                         *DATA["mnist1d"], *STRUCTURES["channel"]])  # fmt: skip
    assert (
        rec["status"] == "not_deployed"
        and rec["dense/params"] == 4 * 3 + 4 + 8 + 4 * 3 + 4 + 4 * 40 * 10 + 10
    )


@pytest.mark.parametrize(
    "target,message",
    [
        ("user_models.NotAModel", "returned NotAModel, not an nn.Module"),
        ("user_models.wrong_classes", r"logits of shape \(2, 1000\).*expected \(2, 10\)"),
        ("user_models.NoSuchNet", "has no attribute 'NoSuchNet'"),
        ("user_models.UserNet", r"fails on a batch of shape \(2, 40\)"),  # built for 3-channel images
    ],
)
def test_bad_model_refused_before_training(tmp_path, target, message):
    extra = ["+model.input_shape=[3,32,32]"] if target.endswith("UserNet") else []
    named = re.escape("model._target_=") + "'?" + re.escape(target) + "'?: "
    with pytest.raises(ConfigError, match=named + ".*" + message):
        run(tmp_path, ["model=custom", f"model._target_={target}", *extra, *DATA["mnist1d"]])
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_cli_refuses_with_one_line(tmp_path):
    proc = run_cli(["model=custom", "model._target_=user_models.ChannelMean", "prune=channel", "logger=none",
                    *DATA["mnist1d"], f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'r'}"],
                   cwd=tmp_path, check=False, env={"PYTHONPATH": str(ROOT / "tests") + ":" + str(ROOT)})  # fmt: skip
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("qpexp: error:")]
    assert len(err) == 1 and "prune.structure=channel" in err[0] and "'stem'" in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "c").exists()
    proc = run_cli(["model=custom", "model._target_=user_models.wrong_classes", "logger=none", *DATA["mnist1d"],
                    f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'r2'}"],
                   cwd=tmp_path, check=False, env={"PYTHONPATH": str(ROOT / "tests") + ":" + str(ROOT)})  # fmt: skip
    assert proc.returncode == 2
    assert "qpexp: error: model._target_=user_models.wrong_classes: returns logits of shape" in proc.stderr


def test_multirun_refuses_bad_model_before_any_point(tmp_path):
    proc = run_cli(["--multirun", "model=custom", "model._target_=user_models.UserNet,user_models.wrong_classes",
                    "logger=none", *DATA["mnist1d"], f"cache_dir={tmp_path / 'c'}",
                    f"hydra.sweep.dir={tmp_path / 's'}"],
                   cwd=tmp_path, check=False, env={"PYTHONPATH": str(ROOT / "tests") + ":" + str(ROOT)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 of 2 sweep points invalid" in proc.stderr
    assert "model._target_=user_models.wrong_classes: returns logits of shape" in proc.stderr
    assert not (tmp_path / "c").exists()
