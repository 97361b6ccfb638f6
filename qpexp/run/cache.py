"""Stage cache: each stage's result stored under a key made from exactly the config that determines it.

An entry is a folder ``<root>/<stage>-<key>/`` with ``model.pt`` (weights and stage state),
``meta.json`` (written last: its presence means complete; it records the sha256 of ``model.pt``)
and ``work/`` (Lightning checkpoints for resuming an interrupted stage). A file lock per entry makes
parallel workers that need the same missing stage train it once: one trains, the others wait and
reuse.

A complete entry whose files do not match their recorded sha256, or that is not a complete torch
file (a partial copy, a flaky network file system), is *damaged*: :meth:`Entry.load_or_discard`
moves it aside (renamed into ``<root>/damaged/``, not deleted) with a :class:`DamagedEntryWarning`
naming it, and the stage is trained again, under the same lock. A file that the weights-only loader
refuses (a pickle payload) is *unsafe*: :class:`~qpexp.io.UnsafeFileError`, nothing is moved.
Entries written before checksums existed are valid if they load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from qpexp._aliases import key_spelling
from qpexp.core.warning import QpexpWarning
from qpexp.io import DamagedFileError, atomic_write_bytes, atomic_write_json, read_json, safe_torch_load

CHECKSUMS = "sha256"  # meta.json key: {file name: sha256 hex digest} of the entry's files


class DamagedEntryWarning(QpexpWarning):
    """A damaged cache entry was moved aside and its stage is trained again."""


def cache_key(payload) -> str:
    """``_target_`` strings hash as spelt before the layout by role (:func:`qpexp._aliases.key_spelling`)."""
    blob = json.dumps(key_spelling(payload), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Entry:
    def __init__(self, path: Path):
        self.path = path
        self.work = path / "work"
        self.moved_aside: Path | None = None  # where a damaged entry went (see load_or_discard)

    @property
    def complete(self) -> bool:
        return (self.path / "meta.json").exists()

    def load(self) -> tuple[dict, dict]:
        """(state, meta), verified: :class:`~qpexp.io.DamagedFileError` when ``meta.json`` is
        unreadable, a file does not match its recorded sha256 or ``model.pt`` is not a complete torch
        file; :class:`~qpexp.io.UnsafeFileError` when ``model.pt`` is a payload the weights-only
        loader refuses (checked even when its checksum does not match)."""
        try:
            meta = read_json(self.path / "meta.json")
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedFileError(f"{self.path / 'meta.json'}: unreadable ({e})") from e
        sums = meta.pop(CHECKSUMS, None) or {}
        bad = [
            n
            for n, digest in sums.items()
            if not (self.path / n).is_file() or _sha256(self.path / n) != digest
        ]
        if bad:
            if "model.pt" in bad and (self.path / "model.pt").is_file():
                try:  # a crafted payload stays "unsafe" (raised here); nothing in it runs
                    safe_torch_load(self.path / "model.pt")
                except DamagedFileError:
                    pass
            raise DamagedFileError(f"{self.path}: {', '.join(bad)} do(es) not match the sha256 in meta.json")
        return safe_torch_load(self.path / "model.pt"), meta

    def load_or_discard(self) -> tuple[dict, dict] | None:
        """:meth:`load` if the entry is complete and intact; None when it is missing, or damaged (then
        moved aside into ``damaged/`` next to it, with a :class:`DamagedEntryWarning` naming it)."""
        if not self.complete:
            return None
        try:
            return self.load()
        except DamagedFileError as e:
            self.moved_aside = self.move_aside()
            warnings.warn(
                f"damaged cache entry {self.path} ({e}): moved aside to {self.moved_aside}; "
                "training the stage again",
                DamagedEntryWarning,
                stacklevel=2,
            )
            return None

    def move_aside(self) -> Path:
        """Rename the entry into ``<parent>/damaged/<name>-<time>`` (kept for inspection)."""
        aside = self.path.parent / "damaged"
        aside.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, i = aside / f"{self.path.name}-{stamp}", 1
        while dest.exists():
            dest, i = aside / f"{self.path.name}-{stamp}-{i}", i + 1
        os.replace(self.path, dest)
        return dest

    def save(self, state: dict, meta: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        atomic_write_bytes(self.path / "model.pt", data)
        sums = {"model.pt": hashlib.sha256(data).hexdigest()}
        atomic_write_json(self.path / "meta.json", {**meta, CHECKSUMS: sums})


class StageCache:
    """``root=None`` disables sharing: entries then live in the run's own folder."""

    def __init__(self, root: str | Path | None, run_dir: str | Path):
        self.root = Path(root) if root is not None else None
        self.run_dir = Path(run_dir)

    @contextmanager
    def entry(self, stage: str, key: str):
        if self.root is None:
            yield Entry(self.run_dir / stage)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{stage}-{key}.lock")):
            yield Entry(self.root / f"{stage}-{key}")
