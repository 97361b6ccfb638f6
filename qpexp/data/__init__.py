"""Data: MNIST-1D (built offline, cached), sklearn digits, or a user's .npz; checked before training.

Every source returns arrays ``x_train, y_train, x_test, y_test`` (optionally ``x_val, y_val``);
:class:`ArrayDataModule` carves the validation split from the training data when none is given,
standardizes with training statistics and serves in-memory batches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch

from qpexp.data.shard import shard_train_loader
from qpexp.errors import DataError
from qpexp.io import atomic_write_bytes

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("QPEXP_DATA_DIR", Path.home() / ".cache" / "qpexp"))


def mnist1d(
    cache_dir: str | None = None,
    num_samples: int = 5000,
    seed: int = 42,
    val_samples: int = 0,
    val_seed: int = 10_042,
) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus 2020) built offline with ``make_dataset``; cached as .npz after the first build.

    ``val_samples > 0`` adds an independent validation split: that many fresh samples drawn by the same
    generator with ``val_seed`` (same distribution, disjoint draws), so the standard 4,000/1,000
    train/test split stays whole and the validation split can be as large as selection needs."""
    if val_samples < 0:
        raise DataError(f"data.source.val_samples={val_samples} must be >= 0")
    if val_samples and val_seed == seed:
        raise DataError(f"data.source.val_seed={val_seed} must differ from data.source.seed={seed}")
    arrays = _mnist1d_build(cache_dir, num_samples, seed)
    if val_samples:
        extra = _mnist1d_build(cache_dir, val_samples, val_seed)
        arrays["x_val"] = np.concatenate([extra["x_train"], extra["x_test"]])
        arrays["y_val"] = np.concatenate([extra["y_train"], extra["y_test"]])
    return arrays


def _mnist1d_build(cache_dir: str | None, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"mnist1d_n{num_samples}_s{seed}.npz"
    if path.exists():
        return load_npz(path)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)
    arrays = {
        "x_train": d["x"].astype(np.float32),
        "y_train": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32),
        "y_test": d["y_test"].astype(np.int64),
    }
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays


def digits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits as (N, 1, 8, 8) images, split into train and test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Load a user's .npz without pickle; missing files and object arrays get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        raise DataError(
            f"data.path={str(path)!r}: cannot load without pickle ({e}); save plain numeric arrays"
        ) from e
    except Exception as e:  # zipfile.BadZipFile, OSError, ...
        raise DataError(f"data.path={str(path)!r}: not a readable .npz file ({e})") from e


def npz(path: str) -> dict[str, np.ndarray]:
    arrays = load_npz(path)
    return {k: v for k, v in arrays.items() if k in (*REQUIRED, "x_val", "y_val")} | {"_source": str(path)}


def check_arrays(arrays: dict, source: str, num_classes: int | None = None) -> int:
    """Validate arrays; return the number of classes. Errors name ``source`` and the array."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(
            f"{source}: missing array(s) {missing}; need {list(REQUIRED)} (optional x_val, y_val)"
        )
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{source}: x_val and y_val must be given together")
    splits = ["train", "test"] + (["val"] if "x_val" in arrays else [])
    shape = None
    for s in splits:
        x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
        if x.dtype.kind not in "fiub":
            raise DataError(f"{source}: x_{s} has dtype {x.dtype}; need numbers")
        if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"{source}: y_{s} has dtype {y.dtype}; need integer class labels")
        if y.ndim != 1:
            raise DataError(f"{source}: y_{s} has shape {y.shape}; need (N,)")
        if x.ndim < 2 or len(x) != len(y):
            raise DataError(
                f"{source}: x_{s} has shape {x.shape} but y_{s} has {len(y)} labels; lengths must match"
            )
        if len(x) == 0:
            raise DataError(f"{source}: x_{s} is empty")
        if shape is not None and x.shape[1:] != shape:
            raise DataError(f"{source}: x_{s} samples have shape {x.shape[1:]}, x_train's have {shape}")
        shape = x.shape[1:]
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: x_{s} holds non-finite values (NaN or inf)")
    # C comes from the config (data.num_classes) or from the training labels
    n_cls = num_classes or int(arrays["y_train"].max()) + 1
    for s in splits:
        y = arrays[f"y_{s}"]
        if y.min() < 0 or y.max() >= n_cls:
            raise DataError(
                f"{source}: y_{s} labels must lie in 0..{n_cls - 1} (C={n_cls}); found {y.min()}..{y.max()}"
            )
    return n_cls


class TensorLoader:
    """Batches sliced from in-memory tensors (no per-sample collate); reshuffled per epoch from
    ``(seed, epoch)`` so a resumed run sees the same order as an uninterrupted one. With ``extra``
    (one row per sample, e.g. a distillation teacher's logits) each batch is ``(x, y, extra)``."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        extra: torch.Tensor | None = None,
    ):
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.extra = extra
        self.epoch = 0
        self.sampler = self  # Lightning calls loader.sampler.set_epoch(epoch)
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        e = self.extra
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
            x, y = self.x[idx], self.y[idx]
            e = e[idx] if e is not None else None
        else:
            x, y = self.x, self.y
        for i in range(0, n, self.batch_size):
            b = slice(i, i + self.batch_size)
            yield (x[b], y[b]) if e is None else (x[b], y[b], e[b])


class ArrayDataModule(L.LightningDataModule):
    """Holds the three splits as tensors. ``source`` is a callable returning the arrays
    (``_partial_`` configs); ``name`` labels errors and records."""

    def __init__(
        self,
        source,
        name: str = "data",
        val_fraction: float = 0.125,
        split_seed: int = 0,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        standardize: bool = True,
        num_classes: int | None = None,
        seed: int = 0,
        path: str | None = None,
    ):
        super().__init__()
        self.source, self.name = source, name
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.standardize, self.num_classes, self.seed = standardize, num_classes, seed
        self.path = path  # the user's file (data=npz); the source reads it
        # a distillation teacher's logits for the train split: the training loader yields them as each
        # batch's third tensor (qpexp.distill; set by the pipeline, None otherwise)
        self.teacher_logits: torch.Tensor | None = None
        self._ready = False

    def prepare(self) -> ArrayDataModule:
        if self._ready:
            return self
        arrays = self.source()
        src = arrays.pop("_source", None) if isinstance(arrays, dict) else None
        label = f"data={self.name}" + (f" ({src})" if src else "")
        self.num_classes = check_arrays(arrays, label, self.num_classes)
        x, y = arrays["x_train"].astype(np.float32), arrays["y_train"].astype(np.int64)
        if "x_val" in arrays:
            xv, yv = arrays["x_val"].astype(np.float32), arrays["y_val"].astype(np.int64)
        else:
            if not 0 < self.val_fraction < 1:
                raise DataError(f"data.val_fraction={self.val_fraction} must lie in (0, 1)")
            perm = np.random.default_rng(self.split_seed).permutation(len(y))
            n_val = max(1, int(round(self.val_fraction * len(y))))
            xv, yv, x, y = x[perm[:n_val]], y[perm[:n_val]], x[perm[n_val:]], y[perm[n_val:]]
        xt, yt = arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64)
        if self.standardize:
            mean, std = float(x.mean()), float(x.std()) or 1.0
            x, xv, xt = ((a - mean) / std for a in (x, xv, xt))
        self.splits = {
            "train": (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)),
            "val": (torch.from_numpy(np.ascontiguousarray(xv)), torch.from_numpy(yv)),
            "test": (torch.from_numpy(np.ascontiguousarray(xt)), torch.from_numpy(yt)),
        }
        self.input_shape = tuple(x.shape[1:])
        self.fingerprint = hashlib.sha256(
            b"".join(t.numpy().tobytes() for pair in self.splits.values() for t in pair)
        ).hexdigest()[:16]
        self._ready = True
        return self

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def loader(self, split: str, shuffle: bool | None = None) -> TensorLoader:
        x, y = self.splits[split]
        train = split == "train"
        bs = self.batch_size if train else self.eval_batch_size
        return TensorLoader(x, y, bs, shuffle=train if shuffle is None else shuffle, seed=self.seed)

    def train_dataloader(self):
        loader = self.loader("train")
        loader.extra = self.teacher_logits
        return shard_train_loader(loader, self.trainer)  # DDP: this rank's share

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")
