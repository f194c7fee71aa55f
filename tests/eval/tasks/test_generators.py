"""Generated tasks: deterministic by seed, the requested token length, needles where asked, exact-match scoring."""

from __future__ import annotations

import random

import pytest

from midtrain.data import byte_tokenizer
from midtrain.eval.gates import RULER_TASKS
from midtrain.eval.tasks import (
    Sample,
    TokenCounter,
    arith_samples,
    max_new_tokens,
    mean_by_metric,
    niah_grid,
    niah_samples,
    passkey_samples,
    ruler_samples,
    score,
)
from midtrain.eval.tasks.haystack import build_context, haystack_sentences, split_sentences
from midtrain.eval.tasks.retrieval import PASSKEY_INTRO, PASSKEY_QUESTION

COUNT = TokenCounter(byte_tokenizer())


def _all(seed: int) -> list[Sample]:
    return (passkey_samples(COUNT, [512], 3, seed) + niah_samples(COUNT, [512], [0.0, 0.5, 1.0], 2, seed)
            + ruler_samples(COUNT, RULER_TASKS, [1024], 2, seed) + arith_samples(4, seed))


def test_generators_are_deterministic_by_seed():
    a, b, c = _all(0), _all(0), _all(1)
    assert [(s.prompt, s.answers) for s in a] == [(s.prompt, s.answers) for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    # A cell's prompts do not depend on which other cells are generated.
    assert passkey_samples(COUNT, [384, 512], 3, 0)[3:] == passkey_samples(COUNT, [512], 3, 0)


@pytest.mark.parametrize("length", [384, 512, 1024])
def test_prompts_have_the_requested_length_in_tokens(length):
    samples = passkey_samples(COUNT, [length], 4, 0) + niah_samples(COUNT, [length], [0.0, 0.5, 1.0], 2, 0)
    if length >= 1024:
        samples += ruler_samples(COUNT, RULER_TASKS, [length], 2, 0)
    for s in samples:
        # BOS, the prompt and every generated token fit in the length; within one haystack sentence of it
        n = COUNT.special_tokens + COUNT(s.prompt) + max_new_tokens(COUNT, s.answers, s.scorer)
        assert length - 60 <= n <= length, (s.metric, n)


def test_lengths_are_counted_in_the_models_tokens():
    """A tokenizer with longer tokens fits more text into the same token length."""
    from midtrain.data.tokenizer import train_bpe

    text = " ".join(haystack_sentences("pydoc")[:400])
    bpe = TokenCounter(train_bpe([text], 400))
    (by_bytes,), (by_bpe,) = passkey_samples(COUNT, [512], 1, 0), passkey_samples(bpe, [512], 1, 0)
    assert 452 - 13 <= bpe(by_bpe.prompt) <= 512 - 13  # BOS and 12 answer tokens fit too
    assert len(by_bpe.prompt) > len(by_bytes.prompt) * 1.2


def test_passkey_follows_the_pi_format():
    (s,) = passkey_samples(COUNT, [512], 1, 7)
    k = s.answers[0]
    assert s.prompt.startswith(PASSKEY_INTRO) and s.prompt.endswith(PASSKEY_QUESTION)
    assert f"The pass key is {k}. Remember it. {k} is the pass key." in s.prompt
    assert 1 <= int(k) <= 50000
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in s.prompt


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_the_requested_depth_on_a_sentence_boundary(depth):
    for s in niah_samples(COUNT, [1024], [depth], 3, 0):
        at = s.meta["needle_char"]
        body_end = s.prompt.index("\nWhat is the special magic number")
        assert abs(at / body_end - depth) < 0.08, (at / body_end, depth)  # one pydoc sentence is < 8% of 1024
        assert at == 0 or s.prompt[at - 2 : at] in (". ", "! ", "? ", ": ", ") ", "' ")


def test_build_context_places_several_needles_in_order():
    sentences = [f"Sentence number {w} is here." for w in "abcdefghijklmnopqrst"]
    ctx = build_context(COUNT, sentences, 400, prefix="P: ", suffix=" Q?", rng=random.Random(0), cycle_from=0,
                        needles=[(0.0, "FIRST."), (0.5, "MIDDLE."), (1.0, "LAST.")])
    assert ctx.text.startswith("P: FIRST. Sentence number a is here.") and ctx.text.endswith("LAST. Q?")
    first, middle, last = ctx.needle_chars
    assert first < middle < last and ctx.text[middle:].startswith("MIDDLE.")
    assert COUNT(ctx.text) <= 400
    with pytest.raises(ValueError, match="too few for this task"):
        build_context(COUNT, sentences, 5, prefix="P: ", suffix=" Q?", rng=random.Random(0), needles=[(0, "N.")])


def test_split_sentences_keeps_plain_prose_only():
    text = "This is a plain sentence here. Call f(x) == 3 now.\n\n   >>> print(1)\n\nAnother fine sentence, yes!"
    assert split_sentences(text) == ["This is a plain sentence here.", "Another fine sentence, yes!"]


def test_ruler_answers_are_in_the_prompt():
    for s in ruler_samples(COUNT, RULER_TASKS, [1024], 2, 3):
        assert all(a in s.prompt for a in s.answers), s.metric
        task = s.metric.split("@")[0].removeprefix("ruler.")
        expected_n = {"niah_multivalue": 4, "niah_multiquery": 2, "vt": 5, "cwe": 10, "fwe": 3}.get(task, 1)
        assert len(s.answers) == expected_n, s.metric


def test_word_extraction_answers_are_the_most_frequent():
    for s in ruler_samples(COUNT, ["cwe", "fwe"], [1024], 3, 0):
        body = s.prompt.split("\n")[1]
        words = [w for w in body.replace(".", " ").split() if w.isalpha()]
        counts = sorted({w: words.count(w) for w in set(words)}.items(), key=lambda kv: -kv[1])
        top = {w for w, _ in counts[: len(s.answers)]}
        assert top == set(s.answers), s.metric
        assert counts[len(s.answers) - 1][1] > counts[len(s.answers)][1]  # no tie at the cut


def test_scoring_right_wrong_and_partial():
    key = Sample("passkey@8", "p", ("4211",), "first_int")
    assert score(key, " 4211. Remember it.") == 1.0
    assert score(key, " 04211") == 1.0
    assert score(key, " 42110") == 0.0 and score(key, " 12 4211") == 0.0 and score(key, "") == 0.0
    multi = Sample("ruler.vt@8", "p", ("ABCDE", "FGHIJ", "KLMNO", "PQRST"), "recall")
    assert score(multi, "abcde, FGHIJ, KLMNO, PQRST") == 1.0
    assert score(multi, "ABCDE and KLMNO") == 0.5
    assert score(multi, "nothing") == 0.0


def test_a_perfect_and_a_silent_model():
    samples = _all(0)
    perfect = [score(s, " " + ", ".join(s.answers) + ".") for s in samples]
    silent = [score(s, "") for s in samples]
    assert set(mean_by_metric(samples, perfect).values()) == {1.0}
    assert set(mean_by_metric(samples, silent).values()) == {0.0}
    grid = niah_grid(samples, perfect)
    assert grid == {"512": {"0": 1.0, "0.5": 1.0, "1": 1.0}}


def test_arith_answers_are_right():
    for s in arith_samples(20, 0):
        question = s.prompt.rsplit("Question: ", 1)[1]
        numbers = [int(w) for w in question.replace("?", " ").replace(".", " ").split() if w.isdigit()]
        assert int(s.answers[0]) in {numbers[0] + numbers[1], numbers[0] - numbers[1], numbers[0] * numbers[1]}
