"""Sharded tokenization (data/sharded_tokenize.py) against the single-process path, tokens/s end to end.

A synthetic jsonl source (Zipf-distributed words, documents of 50-2,000 words, a few million BPE tokens) is written
to a temp dir in four files; each configuration tokenizes it into a fresh cache (a cache hit would skip the work), so
the times include hashing the source, planning, worker start-up, the shard tasks and the merge. Runs are interleaved
(benchmarks.common.interleaved) and medians reported; the ratios are against the single-process path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import BenchResult, interleaved, register

SHARDS = 4


def _corpus(root: Path, n_words: int, seed: int = 0) -> tuple[Path, list[str]]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    weights = [1 / (r + 1) for r in range(len(vocab))]  # Zipf: a few words everywhere, a long tail
    words = rng.choices(vocab, weights, k=n_words)
    docs, i = [], 0
    while i < len(words):
        n = rng.randint(50, 2000)
        docs.append(" ".join(words[i : i + n]))
        i += n
    src = root / "src"
    src.mkdir()
    per_file = -(-len(docs) // 4)
    for f in range(4):
        part = docs[f * per_file : (f + 1) * per_file]
        (src / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return src, docs


@register("tokenize_shards", "sharded tokenization with 1 and 2 worker processes vs the single-process path")
def bench_tokenize_shards(quick: bool = False, repeats: int | None = None,
                          log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.data import tokenize_source, train_bpe
    from midtrain.data.sharded_tokenize import tokenize_sharded

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, docs = _corpus(root, 1_200_000 if quick else 4_000_000)
        mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
        tok = train_bpe(docs[:200], 4096)
        runs = iter(range(1 << 30))

        def fresh() -> Path:
            return root / f"cache{next(runs)}"

        def single() -> None:
            cache = fresh()
            tokenize_source("s", src, "text", tok, holdout_docs=32, cache_dir=cache)
            shutil.rmtree(cache)

        def sharded(workers: int) -> Callable[[], None]:
            def go() -> None:
                cache = fresh()
                tokenize_sharded("s", src, "text", tok, holdout_docs=32, cache_dir=cache, shards=SHARDS,
                                 workers=workers)
                shutil.rmtree(cache)
            return go

        n_tokens = tokenize_source("s", src, "text", tok, holdout_docs=32, cache_dir=root / "ref").n_tokens
        log(f"tokenize_shards: {len(docs)} documents, {mb:.1f} MB, {n_tokens:,} tokens; {os.cpu_count()} CPUs")
        t = interleaved({"single process": single, "sharded, 1 worker": sharded(1),
                         "sharded, 2 workers": sharded(2)},
                        warmup=0 if quick else 1, repeats=repeats or (2 if quick else 3), log=log)
    base = n_tokens / t["single process"].median
    rows = [{"what": name, "seconds": timing.median, "tokens/s": n_tokens / timing.median,
             "vs single": n_tokens / timing.median / base, "spread": timing.spread()} for name, timing in t.items()]
    return BenchResult(
        name="tokenize_shards",
        columns=["what", "seconds", "tokens/s", "vs single", "spread"],
        rows=rows,
        summary=[{"figure": f"{r['what']} / single process tokens/s", "value": r["vs single"], "target": "",
                  "note": ""} for r in rows[1:]],
        notes=[f"{n_tokens:,} tokens ({mb:.1f} MB jsonl in 4 files), {SHARDS} shards, 4096-token BPE, "
               f"{os.cpu_count()} CPUs; times include hashing, worker start-up (spawn) and the merge"],
    )
