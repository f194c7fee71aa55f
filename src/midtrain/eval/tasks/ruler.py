"""RULER-style synthetic tasks (Hsieh et al. 2024), generated offline: needles, variable tracking, word extraction.

Needle format (REFERENCE §6): "One of the special magic numbers for {key} is: {value}." Keys and coded words are
seeded pseudo-words; values 7-digit numbers. Score: case-insensitive recall of all expected strings. QA tasks need
downloaded datasets and are not included.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from midtrain.eval.tasks.base import Sample, TokenCounter, prompt_room, task_rng
from midtrain.eval.tasks.haystack import build_context, haystack_sentences

_SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "ze", "ba", "do", "fi", "gu", "he", "jo")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n")


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def _distinct_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        word = pseudo_word(rng, syllables)
        if word not in words:
            words.append(word)
    return words


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle_task(kind: str) -> Callable[..., Sample]:
    def make(count: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random) -> Sample:
        keys = _distinct_words(rng, 4)
        if kind == "niah_single":
            pairs, asked = [(keys[0], _value(rng))], [keys[0]]
        elif kind == "niah_multikey":  # three distractor keys
            pairs, asked = [(k, _value(rng)) for k in keys], [keys[0]]
        elif kind == "niah_multivalue":  # four values for one key: all are expected
            pairs, asked = [(keys[0], _value(rng)) for _ in range(4)], [keys[0]]
        else:  # niah_multiquery: four keys, two asked
            pairs, asked = [(k, _value(rng)) for k in keys], keys[:2]
        rng.shuffle(pairs)
        needles = [(rng.random(), NEEDLE.format(key=k, value=v)) for k, v in pairs]
        expected = tuple(v for k, v in pairs if k in asked)
        who = " and ".join(asked)
        plural = len(expected) > 1
        question = (f"\nWhat {'are all the special magic numbers' if plural else 'is the special magic number'} for "
                    f"{who} mentioned in the provided text? The special magic "
                    f"{'numbers' if plural else 'number'} for {who} mentioned in the provided text "
                    f"{'are' if plural else 'is'}")
        room = prompt_room(count, length, expected, "recall")
        ctx = build_context(count, sentences, room, prefix=INTRO, suffix=question, needles=needles, rng=rng)
        return Sample(f"ruler.{kind}@{length}", ctx.text, expected, "recall", {"length": length})

    return make


def _variable_tracking(count: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                       hops: int = 4) -> Sample:
    """One chain: VAR A = 12345, VAR B = VAR A, ... (hops links); every name in the chain is expected."""
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in lines)  # in order: each assignment follows the one it reads
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
                f"assigned the value {value}, they are:")
    room = prompt_room(count, length, names, "recall")
    ctx = build_context(count, sentences, room, prefix="Memorize and track the chain(s) of variable assignment "
                        "hidden in the following text.\n", suffix=question, needles=list(zip(depths, lines)), rng=rng)
    return Sample(f"ruler.vt@{length}", ctx.text, tuple(names), "recall", {"length": length})


def _fit_list(count: TokenCounter, words: list[str], budget: int) -> list[str]:
    """The longest prefix of `words`, as a numbered list, within `budget` tokens."""
    used, out = 0, []
    for i, word in enumerate(words):
        cost = count(f" {i + 1}. {word}")
        if used + cost > budget:
            break
        out.append(word)
        used += cost
    return out


def _common_words(count: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random) -> Sample:
    """A numbered word list: `k` common words repeated often, many others once; name the `k` most common."""
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"  # noqa: E501
    probe = count(" 1. " + pseudo_word(rng)) + 1
    k = 3 if length < 1024 else 10
    tail = (f"\nQuestion: What are the {k} most common words in the above list? Answer: The top {k} words "
            "appearing most often in the list are:")
    # the answer's room is estimated with `probe`-sized words here and made exact once the common words are drawn
    budget = length - count.special_tokens - (k * (probe + 2) + 4) - count(head) - count(tail)
    n_items = max(budget // probe, 0)
    repeats = max(3, min(30, n_items // (3 * k)))  # common words take about a third of the list
    if n_items < k * repeats + 1:
        raise ValueError(f"length {length} is too short for ruler.cwe ({k} words x {repeats} repeats)")
    words = _distinct_words(rng, k + n_items, syllables=3)
    common, rare = words[:k], words[k:]
    items = [w for w in common for _ in range(repeats)] + rare[: n_items - k * repeats]
    rng.shuffle(items)
    items = _fit_list(count, items, prompt_room(count, length, common, "recall") - count(head) - count(tail))
    counts = Counter(items)
    top = [w for w, _ in counts.most_common()][:k]
    if sorted(counts[w] for w in common) != sorted(counts[w] for w in top) or min(counts[w] for w in common) <= 1:
        raise ValueError(f"length {length} is too short for ruler.cwe (the common words do not stand out)")
    text = head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + tail
    return Sample(f"ruler.cwe@{length}", text, tuple(common), "recall", {"length": length})


def _frequent_words(count: TokenCounter, sentences: Sequence[str], length: int, rng: random.Random,
                    alpha: float = 2.0) -> Sample:
    """Coded words drawn from a Zipf(alpha) law; name the three most frequent (ties are broken away)."""
    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n"  # noqa: E501
    tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text? Answer: According to the coded text above, the three "
            "most frequently appeared words are:")
    vocab = _distinct_words(rng, 200, syllables=2)
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    per_word = sum(count(f" {w} ....") for w in vocab[:20]) / 20
    budget = prompt_room(count, length, vocab[:3], "recall") - count(head) - count(tail)
    n = int(budget / per_word)
    if n < 12:
        raise ValueError(f"length {length} is too short for ruler.fwe")
    items = rng.choices(vocab, weights=weights, k=n)
    counts = Counter(items)
    while True:  # make the top three strictly more frequent than the rest (exact-match needs a unique answer)
        ranked = counts.most_common()
        ties = [i for i in range(min(3, len(ranked) - 1)) if ranked[i][1] == ranked[i + 1][1]]
        if not ties:
            break
        loser = ranked[ties[-1] + 1][0]
        items[items.index(loser)] = ranked[0][0]
        counts = Counter(items)
    text = head + " ".join(f"{w} ...." for w in items) + tail
    # the average word cost was an estimate: drop rare words from the end until prompt and answer fit
    while count(text) > prompt_room(count, length, [w for w, _ in counts.most_common(3)], "recall"):
        drop = next(i for i in range(len(items) - 1, -1, -1) if counts[items[i]] == 1 or i < 3)
        counts[items.pop(drop)] -= 1
        text = head + " ".join(f"{w} ...." for w in items) + tail
    top = tuple(w for w, _ in counts.most_common(3))
    return Sample(f"ruler.fwe@{length}", text, top, "recall", {"length": length})


_MAKERS: dict[str, Callable[..., Sample]] = {
    **{kind: _needle_task(kind) for kind in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")},
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
}


def ruler_samples(count: TokenCounter, tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int,
                  haystack: str = "pydoc") -> list[Sample]:
    """`n` samples per (task, length), each cell seeded on its own."""
    sentences = haystack_sentences(haystack)
    out = []
    for task in tasks:
        for length in lengths:
            rng = task_rng(seed, "ruler", task, length)
            out += [_MAKERS[task](count, sentences, length, rng) for _ in range(n)]
    return out
