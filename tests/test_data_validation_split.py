"""MNIST-1D's validation split (issue 20, section 2): an independent 4,000-sample draw from the
generator with another seed, large enough to select on, disjoint from train and test, deterministic,
and leaving the standard 4,000/1,000 train/test split whole."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from qpexp.data import ArrayDataModule, mnist1d
from qpexp.errors import DataError


def _module(cache, **source):
    conf = OmegaConf.load("conf/data/mnist1d.yaml")
    kw = {k: conf.source[k] for k in ("num_samples", "seed", "val_samples", "val_seed")} | source
    return ArrayDataModule(lambda: mnist1d(cache_dir=str(cache), **kw), name="mnist1d", val_fraction=0.125)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One build of the default arrays shared by the tests below (the generator is slow)."""
    return tmp_path_factory.mktemp("mnist1d")


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(x)}


def test_default_split_sizes_and_disjointness(cache):
    dm = _module(cache).prepare()
    sizes = {k: len(v[1]) for k, v in dm.splits.items()}
    assert sizes == {"train": 4000, "val": 4000, "test": 1000}  # MNIST-1D's standard 4,000/1,000 kept
    x = {k: v[0].numpy() for k, v in dm.splits.items()}
    assert not _rows(x["val"]) & _rows(x["train"]) and not _rows(x["val"]) & _rows(x["test"])
    # every class present in validation in the generator's balanced proportion (400 each)
    assert np.bincount(dm.splits["val"][1].numpy(), minlength=10).tolist() == [400] * 10
    # standard error of an accuracy p on n samples, sqrt(p (1 - p) / n): 0.40 points at 93%
    assert 100 * np.sqrt(0.93 * 0.07 / sizes["val"]) == pytest.approx(0.403, abs=1e-3)


def test_validation_split_is_deterministic(tmp_path):
    a = mnist1d(cache_dir=str(tmp_path / "a"), num_samples=500, val_samples=500, val_seed=10042)
    b = mnist1d(cache_dir=str(tmp_path / "b"), num_samples=500, val_samples=500, val_seed=10042)
    assert np.array_equal(a["x_val"], b["x_val"]) and np.array_equal(a["y_val"], b["y_val"])
    c = mnist1d(cache_dir=str(tmp_path / "a"), num_samples=500, val_samples=500, val_seed=7)
    assert not np.array_equal(a["x_val"], c["x_val"])
    # the train/test arrays do not depend on the validation draw
    assert np.array_equal(a["x_train"], c["x_train"]) and np.array_equal(a["x_test"], c["x_test"])


def test_val_samples_zero_carves_from_train(cache):
    dm = _module(cache, val_samples=0).prepare()
    assert {k: len(v[1]) for k, v in dm.splits.items()} == {"train": 3500, "val": 500, "test": 1000}


def test_bad_validation_settings_are_refused(tmp_path):
    with pytest.raises(DataError, match="data.source.val_seed=42"):
        mnist1d(cache_dir=str(tmp_path), val_samples=10, seed=42, val_seed=42)
    with pytest.raises(DataError, match="data.source.val_samples=-1"):
        mnist1d(cache_dir=str(tmp_path), val_samples=-1)
