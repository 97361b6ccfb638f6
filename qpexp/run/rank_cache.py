"""The stage cache under DDP: rank 0 decides hit or miss and writes, the other ranks follow."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from qpexp.run.cache import Entry
from qpexp.train.ddp import barrier, broadcast_object, is_distributed, rank


class RankEntry:
    """A cache entry seen by every rank: rank 0 decides hit or miss (under the entry's lock) and
    writes; the others follow its decision and wait for its write at a barrier."""

    def __init__(self, entry):
        self.entry = entry
        self.path, self.work = entry.path, entry.work

    @property
    def moved_aside(self):
        return self.entry.moved_aside

    @property
    def complete(self) -> bool:
        return self.entry.complete

    def load_or_discard(self):
        if rank() == 0:
            loaded = self.entry.load_or_discard()
            broadcast_object(loaded is not None)
            return loaded
        return self.entry.load() if broadcast_object(None) else None

    def save(self, state: dict, meta: dict) -> None:
        if rank() == 0:
            self.entry.save(state, meta)
        barrier()


@contextmanager
def stage_entry(cache, stage: str, key: str):
    """``cache.entry(stage, key)``; under DDP a :class:`RankEntry` (only rank 0 takes the lock: a rank
    waiting for it would block rank 0's training, which needs every rank)."""
    if not is_distributed():
        with cache.entry(stage, key) as entry:
            yield entry
        return
    if rank() == 0:
        with cache.entry(stage, key) as entry:
            broadcast_object(str(entry.path))
            yield RankEntry(entry)
    else:
        yield RankEntry(Entry(Path(broadcast_object(None))))
