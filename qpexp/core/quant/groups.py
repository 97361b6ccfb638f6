"""Per-group weight scales (``granularity=group``): the one definition of the groups.

A weight with output channels along ``ch_axis`` is seen as ``(C, K)``: the channel axis moved to the
front (the other dimensions keep their order) and flattened, so ``K = C_in * kh * kw`` for a conv
weight ``(C_out, C_in, kh, kw)`` (the column order of its ``unfold``ed input, which GPTQ's Hessian
uses), ``K = in_features`` for a linear one. Each row is cut into ``ceil(K / g)`` contiguous groups of
``g = group_size`` elements, the last one shorter when ``g`` does not divide ``K``; group ``j`` of row
``c`` has the scale (and zero point) at flat index ``c * G + j`` (``G`` groups per row).

For the arithmetic a row is zero-padded to ``G * g`` and viewed as ``(C * G, g)``: one "channel" per
group, so torch's per-channel kernels and the per-channel range code apply unchanged. The padding
never changes a range: every min/max quantizer's range contains 0 (symmetric: ``max|w|``;
asymmetric: ``[min(lo, 0), max(hi, 0)]``), and every group holds at least one real element.

Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def n_groups(k: int, group_size: int) -> int:
    """Groups per row: ``ceil(k / group_size)``."""
    return -(-int(k) // int(group_size))


def rows(w: torch.Tensor, ch_axis: int = 0) -> torch.Tensor:
    """``w`` as ``(C, K)``: the channel axis first, the other dimensions flattened in their order."""
    return w.movedim(ch_axis, 0).reshape(w.shape[ch_axis], -1)


def unrows(w2: torch.Tensor, shape, ch_axis: int = 0) -> torch.Tensor:
    """Inverse of :func:`rows` for a weight of ``shape``."""
    ax = ch_axis % len(shape)
    moved = [shape[ax]] + [s for i, s in enumerate(shape) if i != ax]
    return w2.reshape(moved).movedim(0, ax)


def padded(w2: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(C, K)`` rows zero-padded to whole groups and viewed as ``(C * G, group_size)``."""
    c, k = w2.shape
    pad = n_groups(k, group_size) * group_size - k
    if pad:
        w2 = F.pad(w2, (0, pad))
    return w2.reshape(-1, group_size)


def unpadded(wg: torch.Tensor, c: int, k: int) -> torch.Tensor:
    """Inverse of :func:`padded`: ``(C * G, g)`` back to ``(C, K)``."""
    return wg.reshape(c, -1)[:, :k]


def grouped(w: torch.Tensor, ch_axis: int, group_size: int) -> torch.Tensor:
    """:func:`padded` of :func:`rows`: ``w`` as ``(C * G, group_size)``."""
    return padded(rows(w, ch_axis), group_size)


def ungrouped(wg: torch.Tensor, shape, ch_axis: int) -> torch.Tensor:
    """Inverse of :func:`grouped` for a weight of ``shape``."""
    c = shape[ch_axis]
    k = 1
    for i, s in enumerate(shape):
        if i != ch_axis % len(shape):
            k *= s
    return unrows(unpadded(wg, c, k), shape, ch_axis)


def expand(p: torch.Tensor, c: int, k: int, group_size: int) -> torch.Tensor:
    """Per-group values (``C * G`` of them) at every position of the ``(C, K)`` rows."""
    return p.reshape(c, -1).repeat_interleave(group_size, dim=1)[:, :k]
