"""Stage cache: each stage's result stored under a key made from exactly the config that determines it.

An entry is a folder ``<root>/<stage>-<key>/`` with ``model.pt`` (weights and stage state),
``meta.json`` (written last: its presence means complete) and ``work/`` (Lightning checkpoints for
resuming an interrupted stage). A file lock per entry makes parallel workers that need the same
missing stage train it once: one trains, the others wait and reuse.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from qpexp.io import atomic_torch_save, atomic_write_json, read_json, safe_torch_load


def cache_key(payload) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class Entry:
    def __init__(self, path: Path):
        self.path = path
        self.work = path / "work"

    @property
    def complete(self) -> bool:
        return (self.path / "meta.json").exists()

    def load(self) -> tuple[dict, dict]:
        return safe_torch_load(self.path / "model.pt"), read_json(self.path / "meta.json")

    def save(self, state: dict, meta: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, self.path / "model.pt")
        atomic_write_json(self.path / "meta.json", meta)


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
