"""Deterministic mixture sampling over tokens.

Random sampling by weight only matches the target shares in expectation, and documents differ in length by orders
of magnitude, so a mixture defined over *tokens* drifts. A deficit (quota) sampler instead always serves the source
furthest below its token target: realized shares stay within about one document of the weights, with no RNG state.
"""

from __future__ import annotations

import math


class DeficitSampler:
    def __init__(self, weights: list[float]):
        if not weights:
            raise ValueError("mixture needs at least one weight")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"mixture weights must be finite and >= 0 (got {list(weights)})")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError(f"mixture weights sum to 0 (got {list(weights)})")
        self.weights = [float(w) / total for w in weights]
        self.tokens = [0] * len(weights)
        self._active = [i for i, w in enumerate(self.weights) if w > 0]

    def pick(self) -> int:
        """The source whose realized token count is furthest below its target share (ties -> lowest index)."""
        total = sum(self.tokens)
        best, best_deficit = -1, -math.inf
        for i in self._active:
            deficit = self.weights[i] * total - self.tokens[i]
            if deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def add(self, source: int, n_tokens: int) -> None:
        self.tokens[source] += int(n_tokens)

    def shares(self) -> list[float]:
        total = sum(self.tokens)
        return [t / total if total else 0.0 for t in self.tokens]

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "tokens": list(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["tokens"]) != len(self.tokens):
            raise ValueError(f"sampler state has {len(state['tokens'])} sources, this mixture has {len(self.tokens)}")
        if any(abs(a - b) > 1e-12 for a, b in zip(state["weights"], self.weights)):
            raise ValueError(
                f"sampler state was saved with weights {state['weights']}, not {self.weights}; "
                "to change the mixture, start a new loader and carry source cursors instead"
            )
        self.tokens = [int(t) for t in state["tokens"]]


# --------------------------------------------------------------------------- length buckets

Bucket = tuple[int, int | None, float]  # documents of lo <= tokens < hi (None: no bound) supply `share` of tokens


def bucket_of(lengths, buckets: list[Bucket]):
    """Index of each document's bucket (numpy array), -1 where no bucket holds its length."""
    import numpy as np

    lengths = np.asarray(lengths)
    out = np.full(len(lengths), -1, dtype=np.int64)
    for b, (lo, hi, _) in enumerate(buckets):
        out[(lengths >= lo) & ((lengths < hi) if hi is not None else True)] = b
    return out


def source_buckets(data, source) -> list[Bucket] | None:
    """The length buckets of `source` (a TokenizedSource) in a stage whose `data` block (recipe DataConfig) is given.

    `source_length_buckets[name]` wins over `length_buckets`; `upsample_long` (Fu et al. 2024) becomes two buckets,
    [0, min_tokens) and [min_tokens, inf), with the long share given or derived from the natural token share p of
    long documents: f*p / (f*p + 1 - p). None: draw documents by the plain per-source order (no buckets), also when
    upsampling finds no long (or only long) documents in the source.
    """
    import numpy as np

    explicit = data.source_length_buckets.get(source.name, data.length_buckets)
    if explicit is not None:
        return sorted(((b.min, b.max, float(b.share)) for b in explicit), key=lambda b: b[0])
    up = data.upsample_long
    if up is None:
        return None
    lengths = np.diff(np.asarray(source.offsets, dtype=np.int64))
    total = int(lengths.sum())
    p = int(lengths[lengths >= up.min_tokens].sum()) / total if total else 0.0
    if p in (0.0, 1.0):
        return None
    share = up.share if up.share is not None else up.factor * p / (up.factor * p + 1 - p)
    return [(0, up.min_tokens, 1 - share), (up.min_tokens, None, share)]
