"""N:M semi-structured sparsity: at most ``N`` kept weights in every group of ``M`` consecutive weights.

Groups run along a weight's input (reduction) dimension, per output row: ``weight.reshape(out, -1)``
cut into runs of ``M`` columns (a conv's columns in ``(in_channel, kernel position)`` order, the
unfolded GEMM's reduction axis; 2:4 is what NVIDIA's sparse tensor cores run). A row whose length is
not a multiple of ``M`` ends in a short group of ``r < M`` columns that keeps ``min(N, r)``.

Storage (:func:`nm_bits`, counted by :mod:`qpexp.core.accounting`): every group stores its ``N``
kept values at the weight's width (a kept value that quantizes to zero is still stored) plus the
index of the kept set among the ``C(M, N)`` possible ones, ``ceil(log2 C(M, N))`` bits per group
(the enumerative code: 3 bits for 2:4, 7 for 4:8; NVIDIA's hardware format spends ``N ceil(log2 M)``,
4 bits for 2:4). A short group of ``r`` keeps ``k = min(N, r)`` values and ``ceil(log2 C(r, k))``
index bits. Imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_nm(n: int, m: int, key: str = "prune") -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"{key}.n={n!r}, {key}.m={m!r}: N:M sparsity needs integers with 0 < n < m")


def _grouped(x: torch.Tensor, m: int, fill: float) -> torch.Tensor:
    """``x`` as ``(rows, groups, m)``, the last group padded with ``fill``."""
    x2 = x.reshape(x.shape[0], -1)
    pad = (-x2.shape[1]) % m
    return F.pad(x2, (0, pad), value=fill).reshape(x2.shape[0], -1, m)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask (shape of ``scores``) keeping the ``n`` highest scores of every group of ``m`` (ties:
    the lower column index)."""
    check_nm(n, m)
    g = _grouped(scores.float(), m, -math.inf)
    cols = g.shape[1] * m
    # padded slots rank last; a short group keeps min(n, r) real ones
    order = torch.argsort(-g, dim=2, stable=True)
    keep = torch.zeros_like(g)
    keep.scatter_(2, order[:, :, :n], 1.0)
    width = scores.reshape(scores.shape[0], -1).shape[1]
    keep = keep.reshape(scores.shape[0], cols)[:, :width]
    return keep.reshape(scores.shape)


def satisfies_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` of ``w`` has at most ``n`` nonzeros."""
    return bool(((_grouped((w != 0).float(), m, 0.0)).sum(2) <= n).all())


def index_bits(n: int, m: int) -> int:
    """``ceil(log2 C(m, n))``: the bits that name one of the ``C(m, n)`` kept sets of a group."""
    return math.ceil(math.log2(math.comb(m, n))) if math.comb(m, n) > 1 else 0


def nm_bits(w: torch.Tensor, n: int, m: int, bits: int) -> int | None:
    """Payload bits of ``w`` (``out x ...``) in the N:M layout (see the module doc), or None when some
    group holds more than ``n`` nonzeros (the layout cannot store it)."""
    if not satisfies_nm(w, n, m):
        return None
    rows = w.shape[0]
    width = w.numel() // max(rows, 1)
    full, r = divmod(width, m)
    per_row = full * (n * bits + index_bits(n, m))
    if r:
        k = min(n, r)
        per_row += k * bits + index_bits(k, r)
    return rows * per_row
