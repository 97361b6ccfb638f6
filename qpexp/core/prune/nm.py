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
index bits. The integer file writes this layout (``layout: "nm"`` in
:mod:`qpexp.core.quant.package`): a kept set travels as its rank among the ``C(M, N)`` sets in
lexicographic order, the order of ``itertools.combinations(range(M), N)``
(:func:`rank_combination`, :func:`unrank_combination`; :func:`group_columns` picks the set a
group stores). Imports only torch.
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


# -- the kept set of a group as a number: the file's N:M index ----------------------------------------
MAX_COMBINATIONS = 2**62  # ranks are int64: C(m, k) must stay below this


def _comb_table(m: int, k: int) -> torch.Tensor:
    """``C(a, b)`` for ``a`` in ``0..m``, ``b`` in ``0..k`` (int64)."""
    if math.comb(m, k) >= MAX_COMBINATIONS:
        raise ValueError(f"C({m}, {k}) kept sets do not fit a 62-bit rank")
    return torch.tensor([[math.comb(a, b) for b in range(k + 1)] for a in range(m + 1)], dtype=torch.int64)


def rank_combination(cols: torch.Tensor, m: int) -> torch.Tensor:
    """The rank of each kept set among the ``C(m, k)`` ``k``-subsets of ``range(m)`` in lexicographic
    order (``itertools.combinations(range(m), k)``: ``(0, 1), (0, 2), ...`` for 2 of 4).

    ``cols``: ``(..., k)`` integer columns, strictly increasing along the last dim. The rank is
    ``C(m, k) - 1 - sum_i C(m - 1 - c_i, k - i)`` (``i`` from 0): the combinatorial number system
    of the mirrored set ``m - 1 - c``. Returns int64 of shape ``cols.shape[:-1]``."""
    k = cols.shape[-1]
    cols = cols.to(torch.int64)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= m or bool((cols.diff(dim=-1) <= 0).any())):
        raise ValueError(f"rank_combination: columns must be strictly increasing in [0, {m})")
    table = _comb_table(m, k)
    terms = table[m - 1 - cols, k - torch.arange(k)]
    return math.comb(m, k) - 1 - terms.sum(-1)


def unrank_combination(rank: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of :func:`rank_combination`: the ``(..., k)`` increasing columns of each rank
    (``ValueError`` for a rank outside ``[0, C(m, k))``)."""
    rank = rank.to(torch.int64)
    total = math.comb(m, k)
    if rank.numel() and (int(rank.min()) < 0 or int(rank.max()) >= total):
        raise ValueError(f"unrank_combination: a rank outside [0, C({m}, {k}) = {total})")
    table = _comb_table(m, k)
    x = total - 1 - rank
    cols = []
    for i in range(k):  # greedy: the largest a with C(a, k - i) <= x (C(a, j) grows with a)
        col = table[:m, k - i]
        a = (col <= x.unsqueeze(-1)).sum(-1) - 1
        x = x - col[a]
        cols.append(m - 1 - a)
    return torch.stack(cols, -1) if cols else torch.zeros((*rank.shape, 0), dtype=torch.int64)


def group_columns(keep: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` columns each group of ``keep`` (``(..., m)`` bool) stores, ascending: its kept ones
    first, then the lowest free ones (a group with fewer than ``k`` kept still stores ``k`` values).
    The caller checks that no group keeps more than ``k``."""
    order = torch.argsort((~keep.bool()).to(torch.int8), dim=-1, stable=True)
    return torch.sort(order[..., :k], dim=-1).values
