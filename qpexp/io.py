"""Atomic writes and safe loads: a reader never sees half a file; loading never runs pickled code."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def atomic_torch_save(obj, path: str | Path) -> None:
    import io as _io

    buf = _io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class UnsafeFileError(ValueError):
    """A checkpoint or model file that would need arbitrary code (pickle) to load."""


class DamagedFileError(ValueError):
    """A checkpoint or model file that is truncated or corrupt (not a complete torch file), or that
    does not match the checksum recorded for it: damaged, not unsafe."""


def safe_torch_load(path: str | Path):
    """``torch.load(..., weights_only=True)``: tensors and plain containers only; a crafted pickle
    is refused with a clear error (:class:`UnsafeFileError`) and nothing in it runs. A file that is
    not a complete torch file (truncated zip, early end of file) raises :class:`DamagedFileError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused what it read
        raise UnsafeFileError(
            f"{path}: refused to load (weights_only=True allows tensors and plain containers only): {e}"
        ) from e
    except Exception as e:  # the container itself is broken: a partial copy, a flaky file system
        raise DamagedFileError(f"{path}: damaged, not a complete torch file ({type(e).__name__}: {e})") from e


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)
