"""Haystacks from local text and contexts of an exact token length with needles at sentence boundaries.

Haystack text never downloads: `noise` is the PI/YaRN filler, `pydoc` the English help texts every Python install
ships (`pydoc_data.topics`), anything else a local file or directory (.txt / .jsonl, as data sources).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from midtrain.data.sources import iter_documents
from midtrain.eval.tasks.base import TokenCounter

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_GOOD_SENTENCE = re.compile(r"^[A-Za-z][A-Za-z ,;:'()\-]*[.!?]$")  # plain prose: no digits, code or markup


def split_sentences(text: str, min_chars: int = 20, max_chars: int = 200) -> list[str]:
    """Prose sentences of `text` with single spaces; digits, code and markup are dropped (needles hold numbers)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            if min_chars <= len(sentence) <= max_chars and _GOOD_SENTENCE.match(sentence):
                out.append(sentence)
    return out


@lru_cache(maxsize=4)
def haystack_sentences(kind: str) -> tuple[str, ...]:
    """`noise`, `pydoc`, or a local path; raises ValueError with the reason when it yields no usable sentence."""
    if kind == "noise":
        return NOISE
    if kind == "pydoc":
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
    else:
        path = Path(kind)
        if not path.exists():
            raise ValueError(f"haystack {kind!r}: not 'noise', 'pydoc' or an existing local file/directory")
        texts = [doc.text for doc in iter_documents(path)]
    sentences = tuple(s for text in texts for s in split_sentences(text))
    if len(sentences) < 10:
        raise ValueError(f"haystack {kind!r} has {len(sentences)} usable prose sentences (need >= 10)")
    return sentences


@dataclass(frozen=True)
class Context:
    text: str
    needle_chars: tuple[int, ...]  # character offset of each needle in `text` (in the order given)
    n_sentences: int  # haystack sentences used


def build_context(count: TokenCounter, sentences: Sequence[str], length: int, *, prefix: str, suffix: str,
                  needles: Sequence[tuple[float, str]], rng: random.Random, cycle_from: int | None = None) -> Context:
    """`prefix + haystack (with needles) + suffix` of at most `length` tokens, as close to it as sentences allow.

    Each needle `(depth, text)` goes to the sentence boundary nearest `depth` (0 = first, 1 = last) of the haystack.
    Sentences are taken in order from a random start (`cycle_from` fixes it), wrapping around.
    """
    fixed = count(prefix) + count(suffix) + sum(count(" " + text) for _, text in needles)
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"{length} tokens are too few for this task's prompt: instructions, question and needles "
                         f"alone take {fixed}")
    start = rng.randrange(len(sentences)) if cycle_from is None else cycle_from
    chosen: list[str] = []
    costs: list[int] = []
    misses = 0
    for i in range(start, start + 100_000):
        sentence = sentences[i % len(sentences)]
        cost = count(" " + sentence)
        if sum(costs) + cost <= budget:
            chosen.append(sentence)
            costs.append(cost)
            misses = 0
        else:  # a long sentence does not fit: a later, shorter one may fill the rest
            misses += 1
            if misses > min(50, len(sentences)):
                break
    while True:  # piecewise counts can differ from the whole (BPE merges across pieces): trim until it fits
        ctx = _assemble(chosen, costs, prefix, suffix, needles)
        if count(ctx.text) <= length or not chosen:
            return ctx
        chosen.pop()
        costs.pop()


def _assemble(chosen: list[str], costs: list[int], prefix: str, suffix: str,
              needles: Sequence[tuple[float, str]]) -> Context:
    slots: list[list[str]] = [[] for _ in range(len(chosen) + 1)]  # slot i = before sentence i
    cumulative = [0]
    for cost in costs:
        cumulative.append(cumulative[-1] + cost)
    for depth, text in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        # the sentence boundary nearest `depth` of the haystack's tokens (not of its sentence count)
        target = depth * cumulative[-1]
        slot = min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - target), i))
        slots[slot].append(text)
    parts: list[tuple[str, int | None]] = []
    for i in range(len(chosen) + 1):
        for text in slots[i]:
            parts.append((text, _needle_index(needles, text, parts)))
        if i < len(chosen):
            parts.append((chosen[i], None))
    text, offsets = prefix, [0] * len(needles)
    for j, (piece, needle) in enumerate(parts):
        if j:
            text += " "
        if needle is not None:
            offsets[needle] = len(text)
        text += piece
    return Context(text + suffix, tuple(offsets), len(chosen))


def _needle_index(needles: Sequence[tuple[float, str]], text: str, placed: list[tuple[str, int | None]]) -> int:
    """Index of the first not-yet-placed needle with this text (needles may repeat text in principle)."""
    taken = {k for _, k in placed if k is not None}
    return next(k for k, (_, t) in enumerate(needles) if t == text and k not in taken)
