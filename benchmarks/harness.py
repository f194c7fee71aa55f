"""Harness throughput: lm-eval's own `hf` model at batch size 1 (its CLI default) against the batch size midtrain
uses (16), same export, same tasks (midtrain's built-in ones: multiple choice, rolling perplexity, generation), same
process, runs interleaved. The metrics of every run must agree (test_harness_cli.py holds them to lm-eval's CLI).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import BenchResult, register

BATCHES = (1, 16, 64)


def _export(directory: Path, preset: str) -> Path:
    import torch

    from midtrain.data import byte_tokenizer
    from midtrain.model import build_model, preset_config

    tok = byte_tokenizer()
    config = preset_config(preset, vocab_size=len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, \
        tok.pad_token_id
    torch.manual_seed(0)
    model = build_model(config, seed=0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@register("harness", "lm-eval's hf model at batch 1 vs midtrain's batched harness path (built-in local tasks)")
def bench_harness(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.eval.harness import run_harness
    from midtrain.eval.harness_tasks import BUILTIN

    preset, limit = ("tiny-llama", 40) if quick else ("small-llama", 100)
    rounds = repeats or (1 if quick else 2)
    rows, seconds, metrics = [], {b: [] for b in BATCHES}, {}
    with tempfile.TemporaryDirectory() as tmp:
        export = _export(Path(tmp) / "export", preset)
        for r in range(rounds):
            order = BATCHES if r % 2 == 0 else BATCHES[::-1]  # interleaved: foreign load hits every side alike
            for batch in order:
                start = time.perf_counter()
                found, why = run_harness(export, list(BUILTIN), limit=limit, batch_size=batch, seed=0)
                if why:
                    raise RuntimeError(why)
                seconds[batch].append(time.perf_counter() - start)
                metrics[batch] = found
                log(f"harness: batch {batch}: {seconds[batch][-1]:.1f} s")
    base = min(seconds[1])
    for batch in BATCHES:
        best = min(seconds[batch])
        worst = max(abs(metrics[batch][k] - v) / max(abs(v), 1e-12) for k, v in metrics[1].items())
        rows.append({"model": preset, "batch_size": batch, "examples_per_task": limit, "seconds": round(best, 2),
                     "speedup_vs_batch_1": round(base / best, 2), "max_rel_metric_diff": f"{worst:.1e}"})
    return BenchResult(
        name="harness",
        columns=["model", "batch_size", "examples_per_task", "seconds", "speedup_vs_batch_1", "max_rel_metric_diff"],
        rows=rows,
        summary=[{"figure": "harness batch 16 / batch 1 speed", "value": rows[1]["speedup_vs_batch_1"],
                  "target": "> 1", "note": f"{preset}, {', '.join(BUILTIN)}, {limit} examples each"}],
        notes=["each run loads the export afresh, as `midtrain eval` and a stage's after-eval do; best of the rounds",
               "lm-eval sorts requests by length before batching, so padding stays small"],
    )
