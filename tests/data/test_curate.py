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
