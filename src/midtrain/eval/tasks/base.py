"""What every generated task is made of: a prompt, the expected strings, and an exact-match scorer.

Scoring is deterministic string matching on greedy outputs (no LLM judge):
- `first_int`: the first integer in the output equals the answer (passkey, NIAH, arithmetic);
- `recall`: fraction of expected strings found in the output, case-insensitive (RULER's string_match_all).

A task's length L is the whole sequence the model sees: BOS, the prompt and every token it may generate fit in L
(`prompt_room`). A tiny model trained at L knows no position >= L, so an answer generated past it fails for a reason
that has nothing to do with retrieval (REFERENCE §10: one model dropped from 1.00 to 0.83; ours from 0.99 to 0.11).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Sample:
    metric: str  # the metric this sample counts towards, e.g. "passkey@1024"
    prompt: str
    answers: tuple[str, ...]
    scorer: Literal["first_int", "recall"]
    meta: dict = field(default_factory=dict, compare=False)  # depth, length, ... (for details and tests)


FIRST_INT_NEW_TOKENS = 12  # a signed integer of up to ~10 digits, with room for a leading space or word


def max_new_tokens(count: TokenCounter, answers: Sequence[str], scorer: str) -> int:
    """Tokens generated for a sample: room for its answers (with separators), plus a little slack."""
    if scorer == "first_int":
        return FIRST_INT_NEW_TOKENS
    return sum(count(" " + a) + 2 for a in answers) + 4


def prompt_room(count: TokenCounter, length: int, answers: Sequence[str], scorer: str) -> int:
    """Tokens the prompt may take so that BOS, the prompt and every generated token fit in `length`."""
    return length - count.special_tokens - max_new_tokens(count, answers, scorer)


def first_int(output: str) -> str | None:
    match = _INT_RE.search(output)
    return match.group(0) if match else None


def score(sample: Sample, output: str) -> float:
    """1.0 / 0.0 for `first_int`; the fraction of answers present for `recall`."""
    if sample.scorer == "first_int":
        got = first_int(output)
        return float(got is not None and int(got) == int(sample.answers[0]))
    low = output.lower()
    return sum(a.lower() in low for a in sample.answers) / len(sample.answers)


def task_rng(seed: int, *parts: object) -> random.Random:
    """An RNG for one (task, length, ...) cell: independent of which other tasks run, stable across processes."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))  # str seeds hash with sha512: stable


class TokenCounter:
    """Counts text in the model's tokens (no special tokens), caching short pieces that are counted often."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_tokens = int(tokenizer.bos_token_id is not None)  # evaluation prompts start with BOS
        self._cache: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, text: str) -> int:
        if len(text) > 400:
            return len(self.encode(text))
        if text not in self._cache:
            self._cache[text] = len(self.encode(text))
        return self._cache[text]


def mean_by_metric(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for sample, value in zip(samples, scores):
        sums.setdefault(sample.metric, []).append(value)
    return {metric: sum(v) / len(v) for metric, v in sums.items()}
