from __future__ import annotations

import json
import random

import pytest

from midtrain.data import DeficitSampler


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [3, 0, 1], [1, 1, 1, 1, 1, 0.01]])
def test_token_shares_track_weights(weights):
    rng = random.Random(0)
    sampler = DeficitSampler(weights)
    target = [w / sum(weights) for w in weights]
    max_len = 3000
    for _ in range(5000):
        i = sampler.pick()
        sampler.add(i, rng.randint(1, max_len))  # documents of very different lengths
        total = sum(sampler.tokens)
        for j, t in enumerate(target):
            # Overshoot is bounded by one document (a source is only served while at or below target);
            # undershoot by the others' overshoots.
            assert sampler.tokens[j] - t * total <= max_len
            assert t * total - sampler.tokens[j] <= (len(weights) - 1) * max_len
    for realized, t in zip(sampler.shares(), target):
        assert abs(realized - t) < 0.005  # within 0.5 percentage points
    assert all(n == 0 for n, w in zip(sampler.tokens, weights) if w == 0)


def test_ties_go_to_lowest_index_and_zero_weights_are_never_picked():
    s = DeficitSampler([1, 1])
    assert s.pick() == 0
    s.add(0, 10)
    assert s.pick() == 1
    s.add(1, 10)
    assert s.pick() == 0
    z = DeficitSampler([0, 1])
    assert all(z.pick() == 1 for _ in range(3))


def test_state_round_trip_continues_identically():
    rng = random.Random(1)
    a = DeficitSampler([0.6, 0.4])
    for _ in range(100):
        a.add(a.pick(), rng.randint(1, 100))
    b = DeficitSampler([0.6, 0.4])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    lens = [rng.randint(1, 100) for _ in range(200)]
    picks_a, picks_b = [], []
    for n in lens:
        picks_a.append(a.pick())
        a.add(picks_a[-1], n)
        picks_b.append(b.pick())
        b.add(picks_b[-1], n)
    assert picks_a == picks_b and a.tokens == b.tokens
    with pytest.raises(ValueError, match="weights"):
        DeficitSampler([0.5, 0.5]).load_state_dict(a.state_dict())


@pytest.mark.parametrize("bad", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_invalid_weights(bad):
    with pytest.raises(ValueError):
        DeficitSampler(bad)
