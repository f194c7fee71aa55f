"""Document orders as keyed bijections (data/order.py): a permutation for every n, and statistically a shuffle.

The statistics are checked side by side with numpy's `Generator.permutation` (the order the loader stored before):
each bound below is one numpy's own shuffles meet as well."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from midtrain.data.order import DocumentOrder, ShuffledTail, order_key


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 100, 4095, 4096, 4097, 65537])
def test_every_position_has_one_document_and_every_document_one_position(n):
    order = DocumentOrder(n, order_key(0, "src", 0))
    docs = np.asarray(order)
    assert np.array_equal(np.sort(docs), np.arange(n))
    assert [order[p] for p in range(0, n, max(1, n // 50))] == list(docs[:: max(1, n // 50)])  # scalar == vector
    assert np.array_equal(order[n // 3 : n // 2], docs[n // 3 : n // 2])
    if n:
        assert order[-1] == docs[-1]
        with pytest.raises(IndexError):
            order[n]


def test_order_depends_on_key_only():
    a, b = DocumentOrder(1000, order_key(1, "x", 0)), DocumentOrder(1000, order_key(1, "x", 0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    for other in (order_key(2, "x", 0), order_key(1, "y", 0), order_key(1, "x", 1)):
        assert not np.array_equal(np.asarray(a), np.asarray(DocumentOrder(1000, other)))


def _orders(kind: str, n: int, count: int) -> np.ndarray:
    if kind == "bijection":
        return np.stack([np.asarray(DocumentOrder(n, order_key(k, "s", 0))) for k in range(count)])
    rng = np.random.default_rng(0)
    return np.stack([rng.permutation(n) for _ in range(count)])


@pytest.mark.parametrize("kind", ["bijection", "numpy"])
def test_each_document_lands_at_each_position_equally_often(kind):
    n, count = 16, 4000
    orders = _orders(kind, n, count)
    table = np.zeros((n, n), dtype=np.int64)  # position x document
    np.add.at(table, (np.tile(np.arange(n), count), orders.ravel()), 1)
    # each row is a multinomial over documents: a chi-square with n-1 degrees of freedom per row
    chi2 = float((((table - count / n) ** 2) / (count / n)).sum())
    assert stats.chi2.sf(chi2, n * (n - 1)) > 1e-4, chi2


@pytest.mark.parametrize("kind", ["bijection", "numpy"])
def test_no_correlation_with_position_or_between_neighbours(kind):
    n = 200_000
    docs = _orders(kind, n, 1)[0].astype(np.float64)
    bound = 5 / np.sqrt(n)  # five standard errors of a correlation coefficient under independence
    assert abs(np.corrcoef(np.arange(n), docs)[0, 1]) < bound
    assert abs(np.corrcoef(docs[:-1], docs[1:])[0, 1]) < bound
    # consecutive documents stay consecutive about 2/n of the time, as in a uniform shuffle (expected ~2 here)
    assert int(np.sum(np.abs(np.diff(docs)) == 1)) < 12
    # a block of the order is spread over the whole corpus (what a shuffle of shard blocks would not give)
    first = docs[:1000]
    assert stats.kstest(first / n, "uniform").pvalue > 1e-4


def test_shuffled_tail_keeps_the_head_and_permutes_the_rest():
    base = DocumentOrder(5000, order_key(0, "s", 0))
    branch = ShuffledTail(base, 1200, order_key("branch", 1, "s", 0))
    a, b = np.asarray(base), np.asarray(branch)
    assert np.array_equal(a[:1200], b[:1200])
    assert np.array_equal(np.sort(a[1200:]), np.sort(b[1200:])) and not np.array_equal(a[1200:], b[1200:])
    assert all(branch[p] == b[p] for p in (0, 1199, 1200, 4999))
