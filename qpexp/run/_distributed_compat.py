"""What ``qpexp.distributed`` was, for old imports (see :mod:`qpexp._aliases`): the collectives and
synchronisation of :mod:`qpexp.train.ddp`, the rank start-up of :mod:`qpexp.run.ranks`, the
stage cache under DDP of :mod:`qpexp.run.rank_cache`, the training
loader's share of :mod:`qpexp.data.shard`."""

from __future__ import annotations

from qpexp.data import shard as _shard
from qpexp.run import rank_cache as _rank_cache
from qpexp.run import ranks as _ranks
from qpexp.train import ddp as _ddp

_HALVES = (_ranks, _rank_cache, _ddp, _shard)


def __getattr__(name: str):
    for half in _HALVES:
        if hasattr(half, name):
            return getattr(half, name)
    raise AttributeError(f"module 'qpexp.distributed' has no attribute {name!r}")


def __dir__():
    return sorted({n for half in _HALVES for n in dir(half)})
