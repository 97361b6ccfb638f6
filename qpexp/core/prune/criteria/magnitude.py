"""Magnitude criteria: L1 and L2 norm (of each weight, or of each filter/channel group)."""

from __future__ import annotations

from qpexp.core.prune.criteria import Target, slice_view


class L1:
    def __call__(self, t: Target, dim: int | None = None):
        w = t.weight.detach()
        return w.abs() if dim is None else slice_view(w, dim).abs().sum(1)


class L2:
    def __call__(self, t: Target, dim: int | None = None):
        w = t.weight.detach()
        return w.abs() if dim is None else slice_view(w, dim).pow(2).sum(1).sqrt()
