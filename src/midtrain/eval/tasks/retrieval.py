"""Passkey retrieval (the PI / YaRN / LongRoPE format) and the needle-in-a-haystack grid (lengths x depths).

Both are scored by the first integer of the greedy answer. A length counts the model's tokens of BOS, prompt and
answer together (`prompt_room`).
"""

from __future__ import annotations

from collections.abc import Sequence

from midtrain.eval.keys import MetricKey
from midtrain.eval.tasks.base import Sample, TokenCounter, prompt_room, task_rng
from midtrain.eval.tasks.haystack import NOISE, build_context, haystack_sentences

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {k}. Remember it. {k} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NIAH_NEEDLE = "The special magic number is: {v}."
NIAH_QUESTION = "\nWhat is the special magic number mentioned in the text above? The special magic number is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def passkey_samples(count: TokenCounter, lengths: Sequence[int], n: int, seed: int) -> list[Sample]:
    """`n` prompts per length; key k in [1, 50000] at a random depth of the repeated filler (REFERENCE §6)."""
    out = []
    for length in lengths:
        rng = task_rng(seed, "passkey", length)
        for _ in range(n):
            k = str(rng.randint(1, 50000))
            depth = rng.random()
            room = prompt_room(count, length, (k,), "first_int")
            ctx = build_context(count, NOISE, room, prefix=PASSKEY_INTRO + " ", suffix=PASSKEY_QUESTION,
                                needles=[(depth, PASSKEY_NEEDLE.format(k=k))], rng=rng, cycle_from=0)
            out.append(Sample(f"passkey@{length}", ctx.text, (k,), "first_int",
                              {"length": length, "depth": depth, "needle_char": ctx.needle_chars[0]}))
    return out


def niah_samples(count: TokenCounter, lengths: Sequence[int], depths: Sequence[float], n: int, seed: int,
                 haystack: str = "pydoc") -> list[Sample]:
    """`n` prompts per (length, depth) cell; a 7-digit number hidden in local prose at that depth."""
    sentences = haystack_sentences(haystack)
    out = []
    for length in lengths:
        for depth in depths:
            rng = task_rng(seed, "niah", length, depth)
            for _ in range(n):
                value = str(rng.randint(1_000_000, 9_999_999))
                room = prompt_room(count, length, (value,), "first_int")
                ctx = build_context(count, sentences, room, prefix="", suffix=NIAH_QUESTION,
                                    needles=[(depth, NIAH_NEEDLE.format(v=value))], rng=rng)
                out.append(Sample(f"niah@{length}", ctx.text, (value,), "first_int",
                                  {"length": length, "depth": depth, "needle_char": ctx.needle_chars[0]}))
    return out


def niah_grid(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, dict[str, float]]:
    """{length: {depth: accuracy}} (string keys: it goes into JSON) for the NIAH heatmap."""
    cells: dict[tuple[int, float], list[float]] = {}
    for sample, value in zip(samples, scores):
        if MetricKey.parse(sample.metric).task == "niah":
            cells.setdefault((sample.meta["length"], sample.meta["depth"]), []).append(value)
    grid: dict[str, dict[str, float]] = {}
    for (length, depth), values in sorted(cells.items()):
        grid.setdefault(str(length), {})[f"{depth:g}"] = sum(values) / len(values)
    return grid
