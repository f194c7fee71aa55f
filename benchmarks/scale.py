"""The loader at corpus scale: start-up time, resident memory and tokens/s over pre-tokenized corpora of 10M, 100M
and 1B tokens (`--quick`: 1M, 10M, 100M), each made here as dolma-style uint16 shards of 50M tokens and deleted
after.

Each measurement runs in a fresh process (`python -m benchmarks.scale measure ...`) so resident memory is that of one
rank's loader and nothing else: anonymous memory (RssAnon: what the loader allocates; mapped token files are page
cache, shared and reclaimable) and all of it (VmRSS). Side by side: the loader as it was before seeded bijections
(`order=0`: a stored permutation of every document per epoch) over the same cached layout. The loader must outrun
the trainer by 20x: the trainer's tokens/s is measured here on the smallest preset (tiny-llama, seq 256), the
fastest a midtrain run goes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import BenchResult, register

VOCAB, EOS = 32_000, 2
DOC_LEN = (50, 2000)  # uniform: ~1,000 tokens per document
SHARD_TOKENS = 50_000_000
SEQ_LEN, ROWS, STEPS = 2048, 8, 1000
TARGETS = {"rss_ratio": 1.2, "startup_s": 2.0, "vs_trainer": 20.0}


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{EOS}")


def make_corpus(directory: Path, n_tokens: int, seed: int = 0) -> int:
    """Shards of raw uint16 tokens, documents ending with EOS; returns the number of documents."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs = 0
    for k, start in enumerate(range(0, n_tokens, SHARD_TOKENS)):
        n = min(SHARD_TOKENS, n_tokens - start)
        lengths = rng.integers(DOC_LEN[0], DOC_LEN[1] + 1, n // DOC_LEN[0] + 1)
        ends = np.cumsum(lengths)
        ends = ends[ends < n]
        tokens = rng.integers(3, VOCAB, n, dtype=np.uint16)
        tokens[ends - 1] = EOS
        tokens[-1] = EOS
        tokens.tofile(directory / f"part-{k:05d}.npy")
        docs += len(ends) + 1
    return docs


def _memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(corpus: Path, cache: Path, order: int, steps: int) -> dict:
    """One rank's loader over a warm layout cache: start-up (open + loader + first step), memory, tokens/s."""
    from midtrain.config.recipe import Source
    from midtrain.data import PackedLoader
    from midtrain.data.pretokenized import open_pretokenized

    tok = _tokenizer()
    cfg = Source(name="corpus", path=str(corpus), holdout_docs=64)
    before = _memory()
    start = time.perf_counter()
    src = open_pretokenized(cfg, tok, cache_dir=cache)
    loader = PackedLoader([src], [1.0], seq_len=SEQ_LEN, global_batch_seqs=ROWS, seed=0, order=order)
    loader.next_step()
    startup = time.perf_counter() - start
    after_start = _memory()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    elapsed = time.perf_counter() - start
    after_steps = _memory()
    return {"startup_s": startup, "tokens_per_s": steps * ROWS * SEQ_LEN / elapsed, "n_docs": src.n_docs,
            "anon_start": after_start["RssAnon"] - before["RssAnon"], "anon_steps": after_steps["RssAnon"] -
            before["RssAnon"], "rss_steps": after_steps["VmRSS"], "cache_hit": src.cache_hit}


def _child(corpus: Path, cache: Path, order: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "measure", str(corpus), str(cache), str(order),
                          str(steps)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measure failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainer_tokens_per_s(steps: int = 6) -> float:
    """midtrain's real Trainer step on tiny-llama, seq 256, 2,048-token batches (the fastest a run goes here)."""
    from benchmarks.trainer import make_source, midtrain_step

    step = midtrain_step("tiny-llama", 256, 2048, "fp32", make_source(200_000))
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 2048 / (time.perf_counter() - start)


@register("scale", "loader start-up, memory and tokens/s over 10M/100M/1B-token pre-tokenized corpora")
def bench_scale(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.config.recipe import Source
    from midtrain.data.pretokenized import open_pretokenized

    sizes = (1_000_000, 10_000_000, 100_000_000) if quick else (10_000_000, 100_000_000, 1_000_000_000)
    steps = repeats or (200 if quick else STEPS)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="midtrain-scale-"))
    try:
        for n in sizes:
            corpus, cache = root / f"corpus-{n}", root / "cache"
            t = time.perf_counter()
            docs = make_corpus(corpus, n)
            made = time.perf_counter() - t
            t = time.perf_counter()  # the first open: EOS scan, held-out choice, offsets written
            open_pretokenized(Source(name="corpus", path=str(corpus), holdout_docs=64), _tokenizer(), cache_dir=cache)
            cold = time.perf_counter() - t
            log(f"scale: {n:,} tokens, {docs:,} documents (made in {made:.1f} s, first open {cold:.1f} s)")
            for order, name in ((1, "bijection"), (0, "stored permutation (before)")):
                r = _child(corpus, cache, order, steps)
                rows.append({"tokens": n, "docs": r["n_docs"], "loader": name, "first_open_s": round(cold, 2),
                             "startup_s": round(r["startup_s"], 3), "anon_start_MB": round(r["anon_start"] / 1e6, 1),
                             "anon_steps_MB": round(r["anon_steps"] / 1e6, 1), "rss_MB": round(r["rss_steps"] / 1e6),
                             "tokens_per_s": round(r["tokens_per_s"])})
                log(f"  {name}: {rows[-1]}")
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    trainer = trainer_tokens_per_s()
    new = [r for r in rows if r["loader"] == "bijection"]
    small, large = new[0], new[-1]
    # memory the loader holds beyond the interpreter; ratio of the largest corpus to the smallest
    ratio = max(large["anon_steps_MB"], 0.1) / max(small["anon_steps_MB"], 0.1)
    summary = [
        {"figure": f"loader memory (RssAnon growth) {large['tokens']:,} / {small['tokens']:,} tokens",
         "value": round(ratio, 2), "target": f"<= {TARGETS['rss_ratio']}",
         "note": f"{small['anon_steps_MB']} MB vs {large['anon_steps_MB']} MB after {steps} steps"},
        {"figure": f"start-up at {large['tokens']:,} tokens (s)", "value": large["startup_s"],
         "target": f"< {TARGETS['startup_s']}", "note": "open (warm layout) + loader + first step"},
        {"figure": "loader / trainer tokens/s", "value": round(min(r["tokens_per_s"] for r in new) / trainer, 1),
         "target": f">= {TARGETS['vs_trainer']}", "note": f"trainer: tiny-llama seq 256, {trainer:,.0f} tokens/s"},
    ]
    return BenchResult(
        name="scale",
        columns=["tokens", "docs", "loader", "first_open_s", "startup_s", "anon_start_MB", "anon_steps_MB", "rss_MB",
                 "tokens_per_s"],
        rows=rows,
        summary=summary,
        notes=["anon_*: anonymous memory the process gained from before opening the source (what the loader "
               "allocates); rss_MB also counts mapped token pages (page cache shared by the ranks of a node; the "
               "kernel maps cached pages around each one read, so it grows with the corpus while nothing is "
               "allocated)",
               f"{ROWS} rows of {SEQ_LEN} tokens per step, {steps} steps; shards of {SHARD_TOKENS:,} uint16 tokens, "
               f"documents of {DOC_LEN[0]}..{DOC_LEN[1]} tokens",
               "sharded tokenization throughput: python -m benchmarks --only tokenize_shards"],
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        corpus, cache, order, steps = sys.argv[2:6]
        print(json.dumps(measure(Path(corpus), Path(cache), int(order), int(steps))))
