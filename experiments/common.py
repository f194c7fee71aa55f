"""Shared by the experiments: run a recipe in-process with overrides and read back its evaluations.

Every experiment is `python experiments/<name>/run.py [--quick] [--seeds N]`; it writes `results.json` and
`results.md` next to itself, and `python experiments/collect.py` stitches every `results.md` into
docs/EXPERIMENTS.md. Runs use fp32 and one torch thread: tiny matmuls gain nothing from a second thread, and on
shared cores OpenMP spinning makes two far slower (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from midtrain.config import load_recipe
from midtrain.layout import RunLayout
from midtrain.run import RunOptions, run

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("MIDTRAIN_EXPERIMENTS_WORK", "/tmp/midtrain-experiments"))


def run_recipe(recipe: Path, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Runs (or resumes, or finds finished) `recipe` in `run_dir`; returns {eval file stem: metrics}."""
    os.environ.setdefault("MIDTRAIN_CACHE", str(WORK / "cache"))
    loaded = load_recipe(recipe, [f"run_dir={run_dir}", "precision=fp32", *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(loaded, RunOptions(progress=False))
    finally:
        torch.set_num_threads(threads)
    return {p.stem: json.loads(p.read_text())["metrics"] for p in RunLayout(run_dir).eval_files()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


def corpus_dir() -> Path:
    """The demo's real prose and code and synthetic math, with its BPE, built once under WORK (about 20 s)."""
    from midtrain.data.tokenizer import train_bpe
    from midtrain.demo import VOCAB_SIZE, _write_jsonl, code_documents, math_documents, prose_documents

    out = WORK / "corpus"
    if (out / "tokenizer" / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    corpus = {"prose": prose_documents(), "code": code_documents(), "math": math_documents(6000, 0)}
    for name, docs in corpus.items():
        _write_jsonl(out / f"{name}.jsonl", docs)
    tok = train_bpe((d for docs in corpus.values() for d in docs), VOCAB_SIZE)
    tok.save_pretrained(str(out / "tokenizer"))
    return out


def place_recipe(template: Path) -> Path:
    """Copies an experiment's recipe beside the corpus (its source paths and tokenizer are relative to it)."""
    target = corpus_dir() / f"{template.parent.name}-{template.name}"
    target.write_text(template.read_text())
    return target


def shared_base(name: str = "base", schedule: dict | None = None) -> Path:
    """The HF export of experiments/base.yaml's run (trained once, then reused by every continual experiment);
    another `name` with a `schedule` is the same run under that LR schedule (e.g. a WSD stable-phase checkpoint)."""
    run_dir = WORK / name
    overrides = [f"stages.base.schedule={json.dumps(schedule)}"] if schedule else []
    run_recipe(place_recipe(ROOT / "experiments" / "base.yaml"), run_dir, overrides)
    return RunLayout(run_dir).stage("base").export


def continual(name: str, mixture: dict[str, float], seed: int, schedule: dict | None = None,
              tokens: str = "300k", base: Path | None = None) -> dict[str, dict]:
    """One continued-training run from `base` (default: the shared base); returns {"cont-before": metrics, "cont":
    metrics}."""
    base = base or shared_base()
    mix = "{" + ", ".join(f"{k}: {v}" for k, v in mixture.items() if v > 0) + "}"
    overrides = [f"base={base}", f"seed={seed}", f"stages.cont.tokens={tokens}", f"stages.cont.data.mixture={mix}"]
    overrides += [f"stages.cont.schedule={json.dumps(schedule)}"] if schedule else []
    return run_recipe(place_recipe(ROOT / "experiments" / "continual.yaml"), WORK / name / f"seed{seed}", overrides)
