"""Document orders as seeded bijections over [0, n): any position's document is computed, never stored.

A loader that held `rng.permutation(n_docs)` per source and epoch paid 8 bytes per document per rank (≈9 GB per rank
at a billion documents) and O(n) start-up time. `DocumentOrder` computes `order[p]` from `p` with a keyed Feistel
network over the smallest even-bit domain 2^(2h) ≥ n, walking the cycle until the value falls inside [0, n) (at most
~4 steps on average since the domain is < 4n). Memory is O(1) in n; lookups are vectorized.

Quality (tests/data/test_order.py): a bijection for every n; over seeds, each document lands at each position about
equally often (chi-square); no correlation between position and document, or between neighbouring positions'
documents. Six rounds of a 64-bit mix (splitmix64's finalizer) as the round function: a Luby–Rackoff construction
needs ≥ 4 rounds to be indistinguishable from a random permutation; we are not a cipher, only a shuffle.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6
CHUNK = 4096  # positions computed together when single documents are asked for in order
_M64 = (1 << 64) - 1
_C1, _C2, _C3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def order_key(*parts: int | str) -> int:
    """A 64-bit key from seeds and names (stable across processes and platforms, unlike hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _mix(z: np.ndarray) -> np.ndarray:
    z = z * np.uint64(_C1)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_C2)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_C3)
    z ^= z >> np.uint64(31)
    return z


class Order:
    """Indexing shared by the orders: `order[p]` for an int, a slice or an integer array of positions."""

    n: int

    def __len__(self) -> int:
        return self.n

    def documents(self, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def document(self, p: int) -> int:
        return int(self.documents(np.array([p]))[0])

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.documents(np.arange(*key.indices(self.n), dtype=np.int64))
        if isinstance(key, (int, np.integer)):
            p = int(key) + (self.n if key < 0 else 0)
            if not 0 <= p < self.n:
                raise IndexError(f"position {key} out of range for an order of {self.n} documents")
            return self.document(p)
        return self.documents(key)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.documents(np.arange(self.n, dtype=np.int64))
        return out if dtype is None else out.astype(dtype)


class DocumentOrder(Order):
    """A pseudo-random permutation of range(n) keyed by a 64-bit `key`: `order[p]` (int, slice or integer array of
    positions) is the document at position p. `np.asarray(order)` materializes it (tests and small n only)."""

    def __init__(self, n: int, key: int):
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        self.n = int(n)
        half = max(1, ((max(self.n, 2) - 1).bit_length() + 1) // 2)
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        self._keys = [np.uint64(order_key(key, r)) for r in range(ROUNDS)]
        self._chunk: tuple[int, np.ndarray] | None = None  # (first position, documents) of the last chunk used

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << self._half) | right

    def documents(self, positions: np.ndarray) -> np.ndarray:
        """The documents at `positions` (int64 array, each in [0, n))."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self.n):
            raise IndexError(f"position out of range for an order of {self.n} documents")
        y = self._rounds(p.astype(np.uint64).reshape(-1))
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while len(outside):  # cycle walking: the cycle through p (< n) returns below n
            y[outside] = self._rounds(y[outside])
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64).reshape(p.shape)

    def document(self, p: int) -> int:
        lo = p - p % CHUNK
        if self._chunk is None or self._chunk[0] != lo:  # readers walk forward: compute a chunk at a time
            self._chunk = (lo, self.documents(np.arange(lo, min(self.n, lo + CHUNK), dtype=np.int64)))
        return int(self._chunk[1][p - lo])


class ShuffledTail(Order):
    """`base` with the positions from `start` on reordered by a second keyed bijection: what one seed branch of a
    souped stage reads (the positions consumed before the branch point keep their documents)."""

    def __init__(self, base, start: int, key: int):
        self.base, self.start = base, int(start)
        self.n = len(base)
        self._tail = DocumentOrder(self.n - self.start, key)

    def documents(self, positions: np.ndarray) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        tail = p >= self.start
        q = p.copy()
        q[tail] = self.start + self._tail.documents(p[tail] - self.start)
        return np.asarray(self.base[q], dtype=np.int64) if q.size else q

    def document(self, p: int) -> int:
        return int(self.base[p if p < self.start else self.start + self._tail[p - self.start]])
