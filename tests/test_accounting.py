"""Issue 9, definitions: pruned fraction vs zero fraction, MACs of any input rank and architecture,
tied weights, and measurements that change nothing (size accounting, the Taylor gradient pass).

Every expected value is counted by hand, written out as a formula here, or taken from
``torch.utils.flop_counter.FlopCounterMode``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qpexp import models
from qpexp.core import QuantConfig, QuantSpec, count_params, model_macs, quantize_, size_bits
from qpexp.core.accounting import prunable_params, pruned_fraction, sparsity, zero_fraction
from qpexp.core.prune import PruneConfig
from qpexp.core.prune.channel import channel_prune_step, physically_prune
from qpexp.core.prune.criteria.taylor import weight_grads
from qpexp.core.prune.masks import set_mask

FLOAT = QuantSpec(32)  # a quantizer switched off


# -- pruned fraction and zero fraction -------------------------------------------------------------
def test_two_bit_zero_fraction_exceeds_pruned_fraction_by_hand():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.3, 0.8, 0.7], [-0.9, 0.6, 0.2, -0.4]]))
    model = nn.Sequential(lin)
    set_mask(lin, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]))  # 4 of 8 pruned
    # float: the pruned fraction is 4/8, and the stored zeros are exactly those 4
    assert sparsity(model) == pruned_fraction(model) == 4 / 8
    assert zero_fraction(model) == 4 / 8
    quantize_(model, QuantConfig(QuantSpec(2, granularity="tensor", symmetric=True), FLOAT))
    # 2-bit symmetric: levels {-1, 0, 1} x S with S = max|w| / 1 = 1.0 over the kept 1.0, 0.3, -0.9, 0.2:
    # round(0.3) = round(0.2) = 0, so two kept weights are stored as zeros too
    assert pruned_fraction(model) == 4 / 8  # still what pruning removed
    assert zero_fraction(model) == 6 / 8  # zeros of the stored (quantized) weights
    assert zero_fraction(model) > sparsity(model)


def test_channel_pruned_model_counts_removed_channels():
    torch.manual_seed(0)
    model = models.cnn1d((40,), 10)
    x = torch.randn(4, 40)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear)))
    channel_prune_step(model, PruneConfig(ratio=0.5, structure="channel"), 0.5, example=x[:1])
    physically_prune(model, x[:1])
    now = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear)))
    assert now < dense
    expected = 1 - now / dense  # the removed weights are the pruned ones (no zeros remain)
    assert sparsity(model) == pytest.approx(expected) and sparsity(model) > 0.4
    assert pruned_fraction(model, dense_params=dense) == pytest.approx(expected)
    assert zero_fraction(model) == 0.0  # the weights it still stores are all nonzero
    assert prunable_params(model) == now


def test_record_sparsity_and_zero_fraction_from_the_saved_model(tmp_path):
    import numpy as np
    from conftest import TINY, compose

    from qpexp.io import safe_torch_load
    from qpexp.pipeline import Pipeline

    cfg = compose(
        [*TINY, "quant.bits_w=2", "prune.ratio=0.5", "export.enabled=false", f"cache_dir={tmp_path}"]
    )
    rec = Pipeline(cfg, tmp_path / "run").run()
    final = safe_torch_load(f"{rec['artifacts/qat']}/model.pt")["model"]
    latent_zeros = stored_zeros = total = 0
    for key, w in final.items():
        if not key.endswith(".layer.weight"):
            continue
        w = w.numpy().astype(np.float32)
        # the textbook 2-bit symmetric per-channel quantizer: S = max|w_c| / 1, q = round(w / S) in [-1, 1]
        amax = np.abs(w.reshape(len(w), -1)).max(1).reshape(-1, *[1] * (w.ndim - 1))
        q = np.where(amax > 0, np.round(w * (np.float32(1) / np.maximum(amax, 1e-30))), 0)
        latent_zeros += int((w == 0).sum())
        stored_zeros += int((np.clip(q, -1, 1) == 0).sum())
        total += w.size
    assert rec["final/sparsity"] == pytest.approx(latent_zeros / total)
    assert rec["final/zero_fraction"] == pytest.approx(stored_zeros / total)
    assert latent_zeros >= round(0.5 * total) and stored_zeros > latent_zeros
    # in float (the prune stage) every stored zero is a pruned weight
    assert rec["prune/zero_fraction"] == pytest.approx(rec["prune/sparsity"])


# -- MACs ------------------------------------------------------------------------------------------
def _formula_macs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """Per-layer MACs from the textbook formulas (hooks on the modules), and FlopCounterMode's total/2."""
    per, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, i, o, n=name: per.__setitem__(
                        n, math.prod(i[0].shape[:-1]) * mod.in_features * mod.out_features
                    )
                )
            )
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, i, o, n=name: per.__setitem__(
                        n, o.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                    )
                )
            )
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x[:1])
    for h in hooks:
        h.remove()
    return per, fc.get_total_flops() // 2


def test_linear_on_a_3d_input_by_hand():
    model = nn.Sequential(nn.Linear(16, 32))
    m = model_macs(model, torch.randn(1, 10, 16))
    assert m["macs"] == 10 * 16 * 32 == 5120  # 10 positions x 16 inputs x 32 outputs
    assert m["layers"] == {"0": 5120}
    assert m["bops"] == 5120 * 32 * 32


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(16, 8), (1, 16)),
        (nn.Linear(16, 8), (1, 10, 16)),
        (nn.Linear(16, 8), (2, 3, 5, 16)),
        (nn.Conv1d(3, 6, 5, stride=2, padding=1), (1, 3, 20)),
        (nn.Conv1d(4, 8, 3, groups=2), (1, 4, 12)),
        (nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=1), (1, 3, 9, 11)),
        (nn.Conv2d(4, 4, 3, groups=4), (1, 4, 7, 7)),
        (nn.Conv3d(2, 3, 3, padding=1), (1, 2, 4, 5, 6)),
    ],
)
def test_layer_macs_against_formula_and_flop_counter(layer, shape):
    model = nn.Sequential(layer)
    x = torch.randn(*shape)
    per, total = _formula_macs(model, x)
    m = model_macs(model, x)
    assert m["layers"] == per and m["macs"] == per["0"] == total


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda s: models.cnn1d(s, 10), (40,)),
        (lambda s: models.cnn1d(s, 10, batchnorm=True), (2, 40)),
        (lambda s: models.mlp(s, 10), (40,)),
        (lambda s: models.lenet300(s, 10), (28, 28)),
        (lambda s: models.lenet5(s, 10), (1, 8, 8)),
        (lambda s: models.lenet5(s, 10, batchnorm=True), (3, 32, 32)),
    ],
)
def test_builtin_models_macs_and_bops(build, shape):
    torch.manual_seed(0)
    model = build(shape)
    x = torch.randn(2, *shape)
    per, total = _formula_macs(model, x)
    m = model_macs(model, x)
    assert m["layers"] == per and m["macs"] == sum(per.values()) == total
    assert m["bops"] == total * 32 * 32
    # quantized: BOPs = sum over layers of MACs x weight bits x activation bits
    quantize_(model, QuantConfig(QuantSpec(4, granularity="channel", symmetric=True), FLOAT, last_bits=8))
    names = list(per)
    q = model_macs(model, x)
    assert q["layers"] == per  # (batchnorm folded away: it has no MACs)
    assert q["bops"] == sum(per[n] * (8 if n == names[-1] else 4) * 32 for n in names)


# -- tied weights, no side effects -----------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # one 8x8 weight, two biases

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weight_counted_once():
    model = Tied()
    assert size_bits(model) == (64 + 8 + 8) * 32
    assert count_params(model)[0] == 64 + 8 + 8
    assert prunable_params(model) == 64
    _, rows, _ = size_bits(model, detail=True)
    assert rows["b"]["format"] == "shared" and rows["b"]["weight_bits"] == 0
    assert model_macs(model, torch.randn(1, 8))["macs"] == 2 * 64  # computed twice, stored once


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_size_bits_changes_nothing_on_an_uninitialized_lsq_quantizer():
    torch.manual_seed(0)
    model = models.cnn1d((40,), 10)
    quantize_(model, QuantConfig(QuantSpec(4, symmetric=True, range="lsq"), FLOAT))
    before = _snapshot(model)
    assert not bool(model.conv1.wq.initialized)
    first = size_bits(model)
    zero_fraction(model)
    model_macs(model, torch.randn(1, 40))
    assert _same(_snapshot(model), before)  # nothing written: no step size initialized
    assert not bool(model.conv1.wq.initialized) and not model.conv1.wq.is_initialized()
    assert size_bits(model) == first
    model.train()(torch.randn(2, 40))  # the first forward initializes, as it always did
    assert bool(model.conv1.wq.initialized)


def test_taylor_gradient_pass_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = models.cnn1d((40,), 10, batchnorm=True).train()
    for m in model.modules():  # statistics that are not the initial ones
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    batches = [(torch.randn(16, 40), torch.randint(0, 10, (16,))) for _ in range(3)]
    reference = copy.deepcopy(model)
    before = _snapshot(model)
    grads = weight_grads(model, batches, 2)
    assert _same(_snapshot(model), before)  # running_mean, running_var, num_batches_tracked unchanged
    assert model.training and all(p.grad is None for p in model.parameters())
    # the gradients are those of a plain training-mode backward, one per batch
    for name in ("conv1", "conv2", "conv3", "fc"):
        assert len(grads[name]) == 2
    for i, (x, y) in enumerate(batches[:2]):
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for name in ("conv1", "fc"):
            assert torch.allclose(grads[name][i], getattr(reference, name).weight.grad, atol=1e-6)


def test_dense_bn_model_counts_as_its_folded_fp32_model():
    """Issue 20: the dense reference is the deployable fp32 model, BatchNorm folded into the conv
    before it (as quantization folds it). Conv1d(1->4, k3, no bias) + BN(4) + Linear(152->10), by
    hand: folded, 12 conv weights + 4 folded biases + 1520 + 10 linear = 1546 floats; unfolded the
    BN's gamma, beta, mean and var (16 floats) would stand in place of the 4 biases: 1558."""
    from qpexp.core.accounting import deployable_size_bits

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 38, 10),
    )  # fmt: skip
    model[2].running_mean.uniform_(-1, 1)
    model[2].running_var.uniform_(0.5, 2)
    x = torch.randn(8, 40)
    assert size_bits(model) == 1558 * 32  # the model as it is
    assert deployable_size_bits(model, x[:1]) == 1546 * 32
    assert isinstance(model[2], nn.BatchNorm1d) and model[1].bias is None  # the model itself untouched
    quantized = quantize_(
        copy.deepcopy(model), QuantConfig(QuantSpec(bits=32), QuantSpec(bits=32)), example=x[:1]
    )
    assert size_bits(quantized) == deployable_size_bits(quantized, x[:1]) == 1546 * 32  # folded alike


def test_raw_parameter_not_named_weight_has_no_bias_counted():
    """``x @ W`` with a raw ``W``: no bias is known by name, so none is counted (it used to count
    ``W`` a second time as 32-bit bias: 70 x 32 = 2240 bits); the Linear's bias is its 3 x 32 bits."""

    from test_group_quant import _RawMatmul as RawMatmul  # W (10 x 7), then a Linear(7, 3)

    torch.manual_seed(0)
    model, x = RawMatmul(), torch.randn(8, 10)
    quantize_(
        model,
        QuantConfig(weight=QuantSpec(bits=4, granularity="tensor"), act=QuantSpec(bits=8)),
        example=x[:2],
    )
    model.train()
    model(x)
    model.eval()
    total, layers, _ = size_bits(model, detail=True)
    assert layers["W"]["bias_bits"] == 0 and layers["fc"]["bias_bits"] == 3 * 32
    assert total == sum(v["weight_bits"] + v["qparam_bits"] + v["bias_bits"] for v in layers.values())
