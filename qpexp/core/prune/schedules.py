"""Sparsity schedules as plain functions: ``schedule(final, steps, initial) -> [s_1, ..., s_n]``.

Each returns the cumulative target sparsity after every step; the last value is exactly ``final``.
"""

from __future__ import annotations


def oneshot(final: float, steps: int = 1, initial: float = 0.0) -> list[float]:
    return [final]


def geometric(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Each step removes the same fraction of what remains (Han et al. 2015)."""
    keep = (1 - final) / (1 - initial)
    out = [1 - (1 - initial) * keep ** (t / steps) for t in range(1, steps)]
    return out + [final]


def linear(final: float, steps: int, initial: float = 0.0) -> list[float]:
    return [initial + (final - initial) * t / steps for t in range(1, steps)] + [final]


def agp(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Automated gradual pruning (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f)(1 - t/n)^3``."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps)] + [final]


SCHEDULES = {"oneshot": oneshot, "geometric": geometric, "linear": linear, "agp": agp}


def schedule(name: str, final: float, steps: int, initial: float = 0.0) -> list[float]:
    if name not in SCHEDULES:
        raise ValueError(f"prune.schedule={name!r} is unknown: use one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](final, steps, initial)
