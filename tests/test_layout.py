"""The layout by role (issue 22): old module paths and ``_target_`` strings keep resolving, to the same
objects; records and cache entries written before the move still load; no file is left at an old path."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose
from hydra.utils import get_class, get_method, instantiate
from omegaconf import OmegaConf

from qpexp._aliases import ALIASES, ARCH_EXPORTS, key_spelling, new_name, old_target

OLD_SUBMODULES = [  # old dotted paths below an aliased package
    "qpexp.archs.common",
    "qpexp.archs.gru",
    "qpexp.archs.mobilenet",
    "qpexp.archs.resnet",
    "qpexp.archs.transformer",
    "qpexp.archs.vgg",
]

OLD_TARGETS = {  # _target_ strings of users' configs, cache keys and committed records -> the object's new home
    "qpexp.archs.resnet20": "qpexp.models.resnet.resnet20",
    "qpexp.archs.gru": "qpexp.models.gru.gru",
    "qpexp.archs.transformer": "qpexp.models.transformer.transformer",
    "qpexp.archs.resnet.resnet20": "qpexp.models.resnet.resnet20",
    "qpexp.models.resnet20": "qpexp.models.resnet.resnet20",
    "qpexp.vision.vision": "qpexp.data.vision.vision",
    "qpexp.callbacks.FrontierCallback": "qpexp.sweep.callbacks.FrontierCallback",
    "qpexp.callbacks.SweepProgress": "qpexp.sweep.callbacks.SweepProgress",
    "qpexp.models.cnn1d": "qpexp.models.cnn1d",
    "qpexp.data.ArrayDataModule": "qpexp.data.ArrayDataModule",
    "qpexp.data.mnist1d": "qpexp.data.mnist1d",
    "qpexp.pipeline.Pipeline": "qpexp.run.pipeline.Pipeline",
    "qpexp.frontier.write_frontier": "qpexp.sweep.frontier.write_frontier",
    "qpexp.core.sensitivity.evaluate": "qpexp.core.evaluate.evaluate",
    "qpexp.distributed.rank_batches": "qpexp.train.ddp.rank_batches",
    "qpexp.distributed.ddp_session": "qpexp.run.ranks.ddp_session",
    "qpexp.distributed.stage_entry": "qpexp.run.rank_cache.stage_entry",
}


def _obj(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


@pytest.mark.parametrize("old", sorted(ALIASES) + OLD_SUBMODULES)
def test_old_module_is_the_new_module(old):
    new = importlib.import_module(new_name(old))
    assert importlib.import_module(old) is new
    assert new.__spec__.name == new.__name__ == new_name(old)  # the alias did not rename the module


@pytest.mark.parametrize("old", sorted(ALIASES) + OLD_SUBMODULES)
def test_no_file_at_an_old_path(old):
    rel = Path(*old.split("."))
    assert not (ROOT / rel.with_suffix(".py")).exists() and not (ROOT / rel / "__init__.py").exists()


def test_distributed_keeps_both_halves():
    import qpexp.distributed as D
    from qpexp.data import shard
    from qpexp.run import rank_cache, ranks
    from qpexp.train import ddp

    for name in ("rank", "env_rank", "rank_batches", "sync_masks", "RankShard", "shard_train_loader"):
        assert getattr(D, name) in (getattr(ddp, name, None), getattr(shard, name, None))
    for name in ("ddp_session", "requested_world", "_rank_main"):
        assert getattr(D, name) is getattr(ranks, name)
    for name in ("stage_entry", "RankEntry"):
        assert getattr(D, name) is getattr(rank_cache, name)


@pytest.mark.parametrize("old, new", sorted(OLD_TARGETS.items()))
def test_old_target_locates_the_same_object(old, new):
    locate = get_class if old.rpartition(".")[2][:1].isupper() else get_method
    assert locate(old) is _obj(new)


def test_old_targets_instantiate():
    model = instantiate({"_target_": "qpexp.archs.resnet20", "_partial_": True, "width": 0.25})((3, 8, 8), 10)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    model = instantiate({"_target_": "qpexp.archs.gru", "_partial_": True, "hidden": 4})((40,), 10)
    assert model(torch.zeros(2, 40)).shape == (2, 10)
    assert callable(instantiate({"_target_": "qpexp.vision.vision", "_partial_": True}))
    cb = instantiate({"_target_": "qpexp.callbacks.SweepProgress"})
    assert type(cb) is get_class("qpexp.sweep.callbacks.SweepProgress")


def test_arch_exports_listed():
    import qpexp.models

    for name in ARCH_EXPORTS:
        assert getattr(qpexp.models, name) is _obj(f"qpexp.archs.{name}")


def test_key_spelling_is_the_old_one():
    assert old_target("qpexp.models.resnet20") == "qpexp.archs.resnet20"
    assert old_target("qpexp.data.vision.vision") == "qpexp.vision.vision"
    assert old_target("qpexp.models.cnn1d") == "qpexp.models.cnn1d"  # never moved
    assert old_target("qpexp.data.ArrayDataModule") == "qpexp.data.ArrayDataModule"
    assert old_target("qpexp.models.Reshape") == "qpexp.models.Reshape"
    assert old_target("my_pkg.nets.MyNet") == "my_pkg.nets.MyNet"
    cfg = {
        "model": {"_target_": "qpexp.models.gru", "hidden": 6},
        "x": [{"_target_": "qpexp.data.vision.vision"}],
    }
    assert key_spelling(cfg) == {
        "model": {"_target_": "qpexp.archs.gru", "hidden": 6},
        "x": [{"_target_": "qpexp.vision.vision"}],
    }


RECORDS = sorted((ROOT / "docs/reproduction/records").glob("repro_mnist1d_*/*/record.json"))


@pytest.mark.parametrize("path", RECORDS[::3], ids=lambda p: p.parent.parent.name)
def test_records_written_before_the_move_still_match(path):
    """A committed record (``qpexp.archs.gru`` in its config) is complete for its config spelt either
    way: the config hash is the one it was written with."""
    from qpexp.run.pipeline import complete_record, config_hash

    rec = json.loads(path.read_text())
    old = OmegaConf.create(rec["config"])
    assert config_hash(old) == rec["config_hash"]
    new = OmegaConf.create(rec["config"])
    new.model._target_ = new.model._target_.replace("qpexp.archs.", "qpexp.models.")
    assert config_hash(new) == rec["config_hash"]
    assert complete_record(path.parent, old) is not None


def test_cache_entry_written_before_the_move_is_found(tmp_path):
    """The stage keys of a config spelt the old way (``qpexp.archs.resnet20``, as the shipped configs
    were) equal those of the new spelling: an entry cached before the move is a hit after it."""
    from qpexp.run.cache import StageCache
    from qpexp.run.pipeline import Pipeline

    common = [*TINY, f"cache_dir={tmp_path / 'cache'}", "model=resnet20", "model.width=0.25"]
    new = Pipeline(compose(common), tmp_path / "new")
    assert new.cfg.model._target_ == "qpexp.models.resnet20"
    old = Pipeline(compose([*common, "model._target_=qpexp.archs.resnet20"]), tmp_path / "old")
    assert old.keys == new.keys
    with StageCache(tmp_path / "cache", tmp_path / "old").entry("baseline", old.keys["baseline"]) as e:
        e.save({"w": torch.ones(2)}, {"val_acc": 0.5})  # written "before the move"
    with new.cache.entry("baseline", new.keys["baseline"]) as e:
        state, meta = e.load()
    assert torch.equal(state["w"], torch.ones(2)) and meta["val_acc"] == 0.5


def test_every_package_is_shipped():
    """pyproject's explicit package list holds every package folder (a wheel would miss one otherwise)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in [*(ROOT / "qpexp").rglob("__init__.py"), *(ROOT / "hydra_plugins").rglob("__init__.py")]
        if "__pycache__" not in p.parts
    }
    assert found <= listed, found - listed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        mod, _, fn = target.partition(":")
        assert callable(getattr(importlib.import_module(mod), fn)), target


@pytest.mark.parametrize("old", ["qpexp.dashboard", "qpexp.frontier", "qpexp.wandb_views"])
def test_python_m_old_name(old):
    """``python -m qpexp.dashboard`` (documented) runs the new module's command line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
