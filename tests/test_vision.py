"""MNIST/CIFAR in torchvision's real on-disk formats, on small fixtures written byte for byte."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from conftest import TINY, compose

from qpexp.data import DataError
from qpexp.pipeline import Pipeline
from qpexp.vision import vision


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    raw = (
        bytes([0, 0, 0x08, arr.ndim])
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(np.uint8).tobytes()
    )
    path.write_bytes(gzip.compress(raw) if gz else raw)


def mnist_fixture(root, n=120, gz=False, folder="MNIST"):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, m in (("train", n), ("t10k", n // 3)):
        y = rng.integers(0, 10, m).astype(np.uint8)
        x = rng.integers(0, 40, (m, 28, 28)).astype(np.uint8)
        for c in range(10):
            x[y == c, c * 2 : c * 2 + 3, :] = 250  # a bright band per class
        suffix = ".gz" if gz else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
    return root


def cifar_fixture(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8)}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    arrays = vision("mnist", str(mnist_fixture(tmp_path, gz=gz)))
    assert arrays["x_train"].shape == (120, 1, 28, 28) and arrays["x_test"].shape == (40, 1, 28, 28)
    assert arrays["x_train"].max() == pytest.approx(250 / 255)
    assert arrays["y_train"].dtype == np.int64 and arrays["y_train"].max() <= 9


def test_cifar10_python_batches(tmp_path):
    arrays = vision("cifar10", str(cifar_fixture(tmp_path)))
    assert arrays["x_train"].shape == (100, 3, 32, 32) and arrays["x_test"].shape == (20, 3, 32, 32)


def test_cifar_crafted_pickle_refused(tmp_path):
    cifar_fixture(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        vision("cifar10", str(tmp_path))
    assert not marker.exists()


def test_missing_files_named(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        vision("fashion_mnist", str(tmp_path))
    with pytest.raises(DataError, match="data.name"):
        vision("imagenet", str(tmp_path))


def test_pipeline_on_mnist_fixture(tmp_path):
    root = mnist_fixture(tmp_path / "data", n=300)
    cfg = compose([*TINY, "data=vision", "data.name=mnist", f"data.path={root}", "model=lenet5",
                   "baseline.epochs=4", f"cache_dir={tmp_path / 'c'}", "export.enabled=false"])  # fmt: skip
    rec = Pipeline(cfg, tmp_path / "run").run()
    assert rec["status"] == "not_deployed" and rec["baseline/test_acc"] > 0.5  # the bands are easy to learn
