"""prune.quality: Han et al. 2015's per-layer qualities (|w| < t q_l std_l), on a hand-computed example."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose
from torch import nn

from qpexp.core.prune import PruneConfig, check_quality, prune_step


def _model():
    m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # std 1.291 (n - 1)
        m[1].weight.copy_(torch.tensor([[10.0, 20.0], [30.0, 45.0]]))  # std 14.930
    return m


def _kept(m):
    return [sorted(int(v) for v in lin.weight.flatten() if v != 0) for lin in m]


def test_per_layer_quality_by_hand():
    # |w| / std: layer 0 0.775 1.549 2.324 3.098; layer 1 0.670 1.340 2.009 3.014.
    # One quality (Han's global rule): the 4 lowest are 0.670 (10), 0.775 (1), 1.340 (20), 1.549 (2).
    m = _model()
    prune_step(m, PruneConfig(ratio=0.5, criterion="std", scope="global"), 0.5)
    assert _kept(m) == [[3, 4], [30, 45]]
    # quality 2 for layer 0 halves its scores: 0.387 0.775 1.162 1.549 -> it loses 1, 2, 3; layer 1 only 10
    m = _model()
    prune_step(m, PruneConfig(ratio=0.5, criterion="std", scope="global", quality={"0": 2.0}), 0.5)
    assert _kept(m) == [[4], [20, 30, 45]]


def test_quality_errors_name_the_key():
    with pytest.raises(ValueError, match="prune.quality.*scope=global"):
        PruneConfig(scope="layer", quality={"0": 1.0}).validate()
    with pytest.raises(ValueError, match="prune.quality"):
        PruneConfig(quality={"0": -1.0}).validate()
    with pytest.raises(ValueError, match=r"prune.quality: \['fc9'\]"):
        check_quality(_model(), PruneConfig(quality={"fc9": 1.0}))


def test_unknown_layer_refused_before_training(tmp_path):
    from qpexp.errors import ConfigError
    from qpexp.pipeline import Pipeline

    cfg = compose([*TINY, "model=mlp", "prune.criterion=std", "prune.quality={fc9: 2.0}", "quant=none",
                   f"cache_dir={tmp_path / 'c'}", "export.enabled=false"])  # fmt: skip
    with pytest.raises(ConfigError, match="fc9"):
        Pipeline(cfg, tmp_path / "run").run()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
