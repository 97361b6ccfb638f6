"""prune.compact: dead units removed after unstructured pruning (qpexp.core.prune.compact).

References are independent of the code under test: the original model's outputs on fresh inputs
(not the example the removal looked at), shapes and counts written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, compose
from torch import nn

from qpexp.core.accounting import pruned_fraction
from qpexp.core.prune.compact import remove_dead_units
from qpexp.core.prune.masks import get_mask, set_mask
from qpexp.io import safe_torch_load


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))


def test_unread_and_constant_units_go_and_the_function_stays():
    m = _mlp()
    keep1 = torch.ones(6, 8)
    keep1[1] = 0  # unit 1 of layer 0: no input, outputs relu(0.7) = 0.7 always: folded into layer 2
    keep1[4, :5] = 0  # unit 4: some inputs pruned, still alive
    keep2 = torch.ones(4, 6)
    keep2[:, 3] = 0  # unit 3 of layer 0: nobody reads it
    keep2[0, 5] = 0
    with torch.no_grad():
        m[0].bias[1] = 0.7
    set_mask(m[0], keep1)
    set_mask(m[2], keep2)
    fresh = torch.randn(64, 8) * 3
    want = m(fresh).detach()
    kept = remove_dead_units(m, torch.randn(16, 8))
    assert kept == {"0": [0, 2, 4, 5]}
    assert m[0].weight.shape == (4, 8) and m[2].weight.shape == (4, 4) and m[4].weight.shape == (3, 4)
    torch.testing.assert_close(m(fresh), want, rtol=1e-5, atol=1e-5)
    # the unstructured zeros of what is left stay masked: unit 4 (now row 2) lost its first 5 inputs,
    # fc2 row 0 its column 5 (now column 3)
    assert get_mask(m[0])[2, :5].sum() == 0 and get_mask(m[0])[2, 5:].sum() == 3
    assert get_mask(m[2])[0, 3] == 0 and get_mask(m[2]).sum() == 15
    # kept by hand: layer 0 4 rows x 8 - 5 = 27, layer 2 4 x 4 - 1 = 15, layer 4 3 x 4 = 12, of 48 + 24 + 12
    assert pruned_fraction(m) == pytest.approx(1 - (27 + 15 + 12) / 84)


def test_a_unit_with_live_rows_and_columns_is_kept():
    m = _mlp()
    keep2 = torch.ones(4, 6)
    keep2[1:, 2] = 0  # column 2 still read by row 0
    set_mask(m[2], keep2)
    assert remove_dead_units(m, torch.randn(16, 8)) == {}
    assert m[0].weight.shape == (6, 8)


def test_constant_unit_without_a_bias_to_fold_into_is_kept():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3))
    keep1 = torch.ones(6, 8)
    keep1[2] = 0
    with torch.no_grad():
        m[0].bias[2] = 0.5
    set_mask(m[0], keep1)
    fresh = torch.randn(32, 8)
    want = m(fresh).detach()
    assert remove_dead_units(m, torch.randn(16, 8)) == {}
    torch.testing.assert_close(m(fresh), want)


class _ConvNet(nn.Module):
    """LeNet-5's shape, small: conv, pool, conv, pool, flatten, fc, fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 5, 3)
        self.fc1, self.fc2 = nn.Linear(5 * 2 * 2, 7), nn.Linear(7, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_conv_channels_unread_by_fc1_and_constant_ones_go():
    torch.manual_seed(0)
    m = _ConvNet()
    k_fc1 = torch.ones(7, 20)
    k_fc1[:, 4:8] = 0  # conv2 channel 1 (flattened columns 4..7): unread
    k_conv2 = torch.ones(5, 4, 3, 3)
    k_conv2[3] = 0  # conv2 channel 3: constant relu(b), pooled: folded into fc1's bias
    k_conv1 = torch.ones(4, 1, 3, 3)
    k_conv1[2] = 0  # conv1 channel 2: constant, but read by a convolution: kept
    with torch.no_grad():
        m.conv2.bias[3] = 0.4
        m.conv1.bias[2] = 0.3
    set_mask(m.fc1, k_fc1)
    set_mask(m.conv2, k_conv2)
    set_mask(m.conv1, k_conv1)
    fresh = torch.randn(16, 1, 14, 14)
    want = m(fresh).detach()
    kept = remove_dead_units(m, torch.randn(8, 1, 14, 14))
    assert kept == {"conv2": [0, 2, 4]}
    assert m.conv2.weight.shape == (3, 4, 3, 3) and m.fc1.weight.shape == (7, 12)
    assert m.conv1.weight.shape == (4, 1, 3, 3)
    torch.testing.assert_close(m(fresh), want, rtol=1e-5, atol=1e-5)


def test_compact_needs_unstructured_pruning():
    from qpexp.core.prune.spec import PruneConfig

    with pytest.raises(ValueError, match="prune.compact.*prune.structure=unstructured"):
        PruneConfig(compact=True, structure="channel").validate()


def test_pipeline_removes_dead_units_and_the_cache_restores_them(tmp_path):
    """MNIST-1D's MLP pruned hard: fc1 units nobody reads go; the record says how many; the model
    file is that much smaller; a second run restores the structure from the cache, same numbers."""
    from qpexp.pipeline import Pipeline

    over = [*TINY, f"cache_dir={tmp_path / 'cache'}", "export.enabled=false", "model=mlp", "prune.ratio=0.97",
            "prune.compact=true", "quant.bits_w=32"]  # fmt: skip
    rec = Pipeline(compose(over), tmp_path / "r1").run()
    assert rec["status"] == "not_deployed" and "error" not in rec, rec.get("error")  # export off
    removed = {k.rsplit("/", 1)[1]: v for k, v in rec.items() if k.startswith("prune/units_removed/")}
    assert removed and all(v > 0 for v in removed.values())
    state = safe_torch_load(Path(rec["artifacts/prune"]) / "model.pt")
    for layer, kept in state["structure"].items():
        assert state["model"][f"{layer}.weight"].shape[0] == len(kept)
        assert removed[layer] == dense_width(over, layer) - len(kept)
    again = Pipeline(compose(over), tmp_path / "r2").run()
    assert again["cache/prune_hit"]
    for k in ("prune/test_acc", "final/test_acc", "final/params", "final/size_bits", "final/sparsity"):
        assert again[k] == rec[k], k


def dense_width(over: list[str], layer: str) -> int:
    """The layer's output width in a freshly built (dense) model of the same config."""
    from hydra.utils import instantiate

    from qpexp.pipeline import make_model

    cfg = compose(over)
    dm = instantiate(cfg.data)
    dm.prepare()
    return make_model(cfg, dm).get_submodule(layer).weight.shape[0]
