"""Curation with datatrove on a tiny corpus: MinHash removes planted near-duplicates, keeps distinct pairs; stats."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from midtrain.config import load_recipe

from .corpus import prose_texts, write_jsonl

pytest.importorskip("datatrove")
pytest.importorskip("spacy")


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)



def _docs(seed: int = 0):
    rng = random.Random(seed)
    # Real alphabetic words (datatrove's normalisation maps every digit to 0, so "w1", "w2" would all collide).
    vocab = sorted({w for t in prose_texts(400) for w in re.findall(r"[a-z]{3,}", t.lower())})
    assert len(vocab) > 1000

    def doc() -> str:
        return " ".join(rng.choice(vocab) for _ in range(300)) + "."

    distinct = [doc() for _ in range(12)]
    near = []
    for base in distinct[:4]:
        words = base.split()
        for i in rng.sample(range(len(words) - 1), 2):  # 2 substitutions in 300 words: J ~ 0.94
            words[i] = rng.choice(vocab)
        near.append(" ".join(words))
    return distinct, near


def test_minhash_and_exact_dedup_with_stats(tmp_path):
    distinct, near = _docs()
    for a, b in zip(distinct[:4], near):
        assert jaccard(a, b) >= 0.9
    assert max(jaccard(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :]) <= 0.4
    junk = "buy now " * 200
    texts = distinct + near + [distinct[5], junk]  # distinct[5] again: an exact duplicate
    write_jsonl(tmp_path / "web.jsonl", texts, field="body")
    (tmp_path / "r.yaml").write_text(
        f"base: preset:tiny-llama\ntokenizer: bytes\nrun_dir: {tmp_path / 'run'}\n"
        "sources:\n  - {name: web, path: web.jsonl, text_field: body}\n"
        "curation: {filters: [gopher_repetition], tasks: 1}\n"
        "stages:\n  - {name: s, tokens: 1024, seq_len: 64, batch: {tokens: 256}, "
        "schedule: {kind: constant, peak_lr: 1e-3}, data: {mixture: {web: 1.0}}}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    from midtrain.data.curate import curate
    from midtrain.data.prepare import source_input

    with pytest.raises(Exception, match="midtrain data curate"):
        source_input(recipe, "web")
    result = curate(recipe)["web"]
    out_dir, field = source_input(recipe, "web")
    kept = [json.loads(line)["text"] for f in sorted(out_dir.glob("*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode().splitlines()]
    assert field == "text"
    assert junk not in kept
    assert all(d in kept for d in distinct[4:])  # every distinct document survives, once
    assert kept.count(distinct[5]) == 1
    for a, b in zip(distinct[:4], near):  # exactly one of each near-duplicate pair survives
        assert (a in kept) + (b in kept) == 1
    assert len(kept) == 12
    steps = {(r["job"], r["step"].split(":")[-1].strip()): r for r in result["steps"] if "documents" in r}
    rep = next(r for (job, _), r in steps.items() if job == "filter")
    assert (rep["documents"], rep["kept"], rep["removed"]) == (18, 17, 1)
    assert sum(rep["reasons"].values()) == 1
    exact = next(r for (job, _), r in steps.items() if job == "exact-filter")
    assert (exact["documents"], exact["removed"]) == (17, 1)
    mh = next(r for (job, _), r in steps.items() if job == "minhash-filter")
    assert (mh["documents"], mh["removed"]) == (16, 4)
    saved = json.loads((tmp_path / "run" / "data" / "curation" / "web.json").read_text())
    assert saved["steps"] == result["steps"]


def _article(seed: int) -> str:
    """Varied English-like web prose that the web-quality filters keep: 14 full sentences, stop words, punctuation."""
    rng = random.Random(seed)
    vocab = sorted({w for t in prose_texts(400) for w in re.findall(r"[a-z]{4,9}", t.lower())})

    def w() -> str:
        return rng.choice(vocab)

    return "\n".join(f"The {w()} of the {w()} was {w()} and {w()}, so we {w()} it with {w()} {w()} that {w()}."
                     for _ in range(14))


def _two_source_recipe(tmp_path, curation: str):
    write_jsonl(tmp_path / "web.jsonl", [_article(i) for i in range(6)] + ["buy now " * 200])
    write_jsonl(tmp_path / "math.jsonl", [f"{a} + {b} = {a + b}" for a in range(1, 9) for b in range(1, 4)])
    (tmp_path / "r.yaml").write_text(
        f"base: preset:tiny-llama\ntokenizer: bytes\nrun_dir: {tmp_path / 'run'}\n"
        "sources:\n  - {name: web, path: web.jsonl, domain: general}\n  - {name: math, path: math.jsonl}\n"
        f"curation: {curation}\n"
        "stages:\n  - {name: s, tokens: 1024, seq_len: 64, batch: {tokens: 256}, "
        "schedule: {kind: constant, peak_lr: 1e-3}, data: {mixture: {web: 0.5, math: 0.5}}}\n")
    return load_recipe(tmp_path / "r.yaml")


def test_auto_filters_clean_web_text_and_keep_curated_math(tmp_path):
    """Issue 24: the web filters applied to every source deleted curated math and code, then crashed the next job."""
    from midtrain.data.curate import curate

    results = curate(_two_source_recipe(tmp_path, "{minhash: false, exact_dedup: false}"))
    web, math = results["web"]["removal"], results["math"]["removal"]
    assert math == {"documents": 24, "kept": 24, "filters": [], "removed": {}}  # curated data: no web heuristics
    assert web["filters"] == ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    assert web["documents"] == 7 and web["kept"] == 6 and sum(web["removed"].values()) == 1  # the spam page
    assert "warning" not in web and "warning" not in math


def test_filters_that_empty_a_source_stop_with_its_name_and_filters(tmp_path):
    from midtrain.data.curate import curate
    from midtrain.data.errors import DataError

    recipe = _two_source_recipe(tmp_path, "{per_source: {math: [gopher_quality]}, minhash: false}")
    with pytest.raises(DataError, match=r"curation of source 'math': its filters removed all 24 documents "
                                        r"\(0 of 24 kept; Gopher Quality: 24\); give it other filters"):
        curate(recipe)


def test_a_source_mostly_removed_is_warned_about(tmp_path):
    from midtrain.data.curate import curate

    recipe = _two_source_recipe(tmp_path, "{per_source: {web: [gopher_repetition]}, minhash: false, warn_removed: 0.1}")
    web = curate(recipe, only=["web"])["web"]["removal"]
    assert web["kept"] == 6 and web["warning"].startswith("curation removed 14% of source 'web' (6 of 7 kept;")
