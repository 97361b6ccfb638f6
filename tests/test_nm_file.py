"""Issue 24: the integer file stores N:M-sparse weights in the N:M layout.

Every expectation is written out: the 2:4 ranks as a table, the 4:8 ranks against
``itertools.combinations``, the payload bits of a layer from its shape.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qpexp.core.prune.nm import rank_combination, unrank_combination

torch.set_num_threads(1)


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- the rank of a kept set ------------------------------------------------------------------------
TWO_OF_FOUR = {(0, 1): 0, (0, 2): 1, (0, 3): 2, (1, 2): 3, (1, 3): 4, (2, 3): 5}  # lexicographic


def test_rank_and_unrank_2_of_4_by_hand():
    cols = torch.tensor(list(TWO_OF_FOUR))
    assert rank_combination(cols, 4).tolist() == list(TWO_OF_FOUR.values())
    assert [tuple(c) for c in unrank_combination(torch.arange(6), 4, 2).tolist()] == list(TWO_OF_FOUR)
    # any leading shape
    assert rank_combination(cols.reshape(2, 3, 2), 4).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("m, k", [(8, 4), (3, 2), (5, 1), (7, 7)])
def test_rank_and_unrank_against_itertools(m, k):
    sets = list(itertools.combinations(range(m), k))  # lexicographic order
    cols = torch.tensor(sets).reshape(len(sets), k)
    assert rank_combination(cols, m).tolist() == list(range(math.comb(m, k)))
    exact(unrank_combination(torch.arange(len(sets)), m, k), cols)


def test_rank_refuses_what_is_not_a_set():
    with pytest.raises(ValueError, match="strictly increasing"):
        rank_combination(torch.tensor([[1, 1]]), 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        rank_combination(torch.tensor([[1, 4]]), 4)
    with pytest.raises(ValueError, match=r"C\(4, 2\) = 6"):
        unrank_combination(torch.tensor([6]), 4, 2)
