"""MNIST-family and CIFAR-10 in torchvision's on-disk layout, read without torchvision.

``torchvision`` (the optional ``vision`` extra) is only needed to *download* the files
(``data.download=true`` on a machine with internet); reading uses the files' own formats:

- MNIST / FashionMNIST / KMNIST: ``<root>/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (IDX: big-endian magic, dimensions, then raw uint8).
- CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``, Python pickles of
  ``{b"data": uint8 (N, 3072), b"labels": [...]}``, read with an unpickler that only admits
  numpy's array reconstruction (a crafted file cannot run code).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from qpexp.data import DataError

MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"data.root: missing {folder / stem}[.gz] (download with data.download=true, needs torchvision)"
    )


def mnist_family(name: str, root: str) -> dict[str, np.ndarray]:
    folder = Path(root) / MNIST_FOLDERS[name] / "raw"
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        out[f"x_{split}"] = (x.astype(np.float32) / 255.0)[:, None]
        out[f"y_{split}"] = y.astype(np.int64)
    return out


class _NumpyOnly(pickle.Unpickler):
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store raw bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"data.root: missing {path} (download with data.download=true, needs torchvision)")
    d = _NumpyOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d["labels"], dtype=np.int64)


def cifar10(root: str) -> dict[str, np.ndarray]:
    folder = Path(root) / "cifar-10-batches-py"
    train = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = _cifar_batch(folder / "test_batch")
    return {
        "x_train": np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0,
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": xt.astype(np.float32) / 255.0,
        "y_test": yt,
    }


def vision(name: str, root: str, download: bool = False) -> dict[str, np.ndarray]:
    """``name``: mnist, fashion_mnist, kmnist or cifar10, read from ``root`` in torchvision's layout."""
    if name not in (*MNIST_FOLDERS, "cifar10"):
        raise DataError(f"data.name={name!r} is unknown: use one of {[*MNIST_FOLDERS, 'cifar10']}")
    if download:
        try:
            import torchvision.datasets as tvd
        except ImportError as e:
            raise DataError("data.download=true needs torchvision: pip install 'qpexp[vision]'") from e
        cls = {
            "mnist": tvd.MNIST,
            "fashion_mnist": tvd.FashionMNIST,
            "kmnist": tvd.KMNIST,
            "cifar10": tvd.CIFAR10,
        }
        for train in (True, False):
            cls[name](root, train=train, download=True)
    return cifar10(root) if name == "cifar10" else mnist_family(name, root)
