"""Proxy runs: a one-stage recipe derived from a real stage, trained by the real run machinery.

A proxy is the stage with another mixture and a shorter budget, in a run dir of its own: same model, tokenizer,
sequence length, batch, optimizer and LR schedule shape (warm-up scaled with the budget, `start_lr: from_previous`
resolved to the number the plan computes), starting from the stage's start checkpoint (or another `start`). Its
result is the stage's after-eval, kept in `<proxy>/result.json` (written atomically, last): a proxy with a result is
never trained again, and one stopped half-way resumes from its own checkpoints through `midtrain run`'s resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from midtrain.config import Recipe, load_recipe
from midtrain.config.base_ref import BaseRef
from midtrain.eval.keys import MetricKey
from midtrain.io import write_json_atomic, write_text_atomic
from midtrain.layout import ProxyLayout, RunLayout
from midtrain.plan import build_plan


class MixError(Exception):
    """Bad input to a mixture search or valuation (stage, metric, source, options); the message says what to change."""


class MixRunError(MixError):
    """A search or valuation could not proceed: a proxy failed, a directory holds other settings, a metric is
    missing from a proxy's eval."""


def stage_index(recipe: Recipe, name: str, where: str | Path) -> int:
    for i, stage in enumerate(recipe.stages):
        if stage.name == name:
            return i
    raise MixError(f"{where}: no stage {name!r} (stages: {', '.join(s.name for s in recipe.stages)})")


def higher_is_better(metric: str) -> bool:
    """Losses and perplexities fall as a model improves; accuracies and recalls rise (a name that is not a metric
    key counts as a score)."""
    key = MetricKey.try_parse(metric)
    return key is None or not key.lower_is_better


def stage_start(recipe: Recipe, index: int, start: str | None = None) -> str:
    """The `base:` a proxy of stage `index` starts from: `start` when given (a local HF dir or `preset:NAME`), else
    what the stage itself starts from: the recipe's base (first stage) or the previous stage's HF export."""
    if start:
        if BaseRef.parse(start).kind != "path":
            return start
        path = Path(start).resolve()
        if not (path / "config.json").is_file():
            raise MixError(f"--start {start}: not a Hugging Face checkpoint directory (no config.json)")
        return str(path)
    if index == 0:
        return recipe.base
    previous = recipe.stages[index - 1].name
    export = RunLayout(recipe.run_dir).stage(previous).export
    if not RunLayout(recipe.run_dir).stage(previous).export_info.is_file():
        raise MixError(
            f"stage {recipe.stages[index].name!r} starts from stage {previous!r}'s export {export}, which does not "
            f"exist yet: run the recipe through {previous!r} first (`midtrain run RECIPE`), or pass "
            "--start DIR|preset:NAME"
        )
    return str(export.resolve())


def derive_recipe(recipe: Recipe, index: int, *, mixture: dict[str, float], tokens: int, run_dir: Path,
                  start: str, seed: int | None = None, tasks: Sequence[str] | None = None,
                  extra_sources: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The one-stage proxy recipe (a plain mapping, as YAML would hold it) for stage `index` of `recipe`."""
    from midtrain.data.prepare import curated_dir

    plan = build_plan(recipe)
    stage_cfg, planned = recipe.stages[index], plan.stages[index]
    data = recipe.model_dump(mode="json")
    stage = data["stages"][index]
    stage["tokens"] = int(tokens)
    # The start LR and peak as the full run computes them (from_previous needs a previous stage a proxy lacks).
    schedule = stage["schedule"]
    schedule["peak_lr"] = planned.schedule.peak_lr
    warmup = stage_cfg.schedule.warmup_tokens
    if warmup:
        scaled = int(round(warmup * tokens / stage_cfg.tokens))
        schedule["warmup_tokens"] = scaled if 0 < scaled < tokens else 0
    stage["start_lr"] = planned.schedule.start_lr if schedule["warmup_tokens"] else None
    if index == 0 and start == recipe.base:
        stage["init"] = recipe.stage_init(0)
    else:
        stage["init"] = "scratch" if BaseRef.parse(start).is_preset else "weights"
    stage["data"]["mixture"] = {k: float(v) for k, v in mixture.items() if v > 0}
    stage["data"]["replay"] = None  # already folded into the effective mixture the proxies perturb
    stage["gate"] = {}  # a proxy reports; it never stops on a gate
    if stage.get("seeds"):  # a souped stage (K branches): a proxy is one branch, the recipe's seed
        stage["seeds"] = None
    stage["eval"]["every_tokens"] = None
    if tasks is not None:
        stage["eval"]["tasks"] = list(tasks)
    data["stages"] = [stage]
    data["base"] = start
    data["run_dir"] = str(Path(run_dir).resolve())
    data["checkpoint"] = {"every_tokens": None, "keep_last": 1}
    if seed is not None:
        data["seed"] = int(seed)
    if data.get("curation") and data["curation"].get("output") is None:  # curated data stays where the run has it
        data["curation"]["output"] = str(curated_dir(recipe).resolve())
    data["sources"] = data["sources"] + [dict(s) for s in extra_sources]
    return data


@dataclass(frozen=True)
class Proxy:
    """One proxy run: its directory and its derived recipe."""

    dir: Path
    stage: str
    recipe: dict[str, Any]

    @property
    def result_file(self) -> Path:
        return ProxyLayout(self.dir).result

    @property
    def done(self) -> bool:
        return self.result_file.is_file()

    def result(self) -> dict[str, Any]:
        return json.loads(self.result_file.read_text())

    def prepare(self) -> None:
        """Writes the proxy's recipe; refuses a directory that holds a proxy of other settings."""
        text = yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True)
        path = ProxyLayout(self.dir).recipe
        if path.is_file() and path.read_text() != text:
            if self.done or ProxyLayout(self.dir).run.root.exists():
                raise MixRunError(f"{self.dir} holds a proxy trained with other settings (see its {path.name}); use a "
                                  "new --out, or delete that directory to train it again")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)


def train_proxy(proxy_dir: Path, stage: str, *, keep_models: bool = False, console=None) -> dict[str, Any]:
    """Trains (or resumes) the proxy in `proxy_dir` and writes its result.json; returns the result."""
    from midtrain.data import DataError
    from midtrain.run import RunError, RunOptions, run
    from midtrain.train import checkpoint
    from midtrain.train.runlock import RunLockError

    files = ProxyLayout(proxy_dir)
    result_file = files.result
    if result_file.is_file():
        return json.loads(result_file.read_text())
    recipe = load_recipe(files.recipe)
    t0 = time.time()
    try:
        run(recipe, RunOptions(progress=False, console=console))
    except (RunError, RunLockError, DataError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as exc:
        raise MixRunError(f"proxy {proxy_dir} failed: {exc} (log: {files.log})") from None
    layout = RunLayout(recipe.run_dir)
    after = json.loads(layout.stage(stage).eval_after.read_text())
    before_file = layout.stage(stage).eval_before
    before = json.loads(before_file.read_text())["metrics"] if before_file.is_file() else {}
    stage_cfg = recipe.stages[0]
    result = {
        "stage": stage,
        "mixture": stage_cfg.data.mixture,
        "tokens": after["tokens"],
        "seed": recipe.seed,
        "base": recipe.base,
        "metrics": after["metrics"],
        "before": before,
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(result_file, result)
    if not keep_models:  # proxies are many: keep what they measured, not their weights
        for weights in layout.weight_dirs:
            shutil.rmtree(weights, ignore_errors=True)
    return result


def _train_in_worker(proxy_dir: str, stage: str, threads: int, keep_models: bool) -> dict[str, Any]:
    """Process-pool entry point: one thread budget per worker, everything the run prints into the proxy's log."""
    import torch

    torch.set_num_threads(threads)
    path = Path(proxy_dir)
    with open(ProxyLayout(path).log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        return train_proxy(path, stage, keep_models=keep_models)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_proxies(proxies: Sequence[Proxy], *, workers: int = 1, threads: int | None = None,
                keep_models: bool = False, on_done: Callable[[Proxy, dict], None] | None = None) -> list[dict]:
    """Trains the proxies that have no result yet (`workers` processes at a time); returns every result in order."""
    for proxy in proxies:
        proxy.prepare()
    pending = [p for p in proxies if not p.done]
    threads = threads or default_threads(workers)
    if pending and workers > 1:
        _tokenize_once(pending[0])  # the workers then all read the cache instead of racing to fill it
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_in_worker, str(p.dir), p.stage, threads, keep_models): p for p in pending}
            for future in as_completed(futures):
                result = future.result()
                if on_done:
                    on_done(futures[future], result)
    else:
        import torch
        from rich.console import Console

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for proxy in pending:
                with open(ProxyLayout(proxy.dir).log, "a") as fh:
                    result = train_proxy(proxy.dir, proxy.stage, keep_models=keep_models,
                                         console=Console(file=fh, width=160))
                if on_done:
                    on_done(proxy, result)
        finally:
            torch.set_num_threads(previous)
    return [p.result() for p in proxies]


def _tokenize_once(proxy: Proxy) -> None:
    from midtrain.data import default_cache_dir
    from midtrain.data.prepare import apply_special_tokens, tokenize_recipe_sources
    from midtrain.run import resolve_tokenizer

    recipe = load_recipe(ProxyLayout(proxy.dir).recipe)
    tokenizer = resolve_tokenizer(recipe)
    apply_special_tokens(recipe, tokenizer)
    tokenize_recipe_sources(recipe, tokenizer, cache_dir=default_cache_dir())


def metric_of(result: dict[str, Any], metric: str, where: Path) -> float:
    value = result.get("metrics", {}).get(metric)
    if value is None:
        known = ", ".join(sorted(result.get("metrics", {})))
        raise MixRunError(f"{where}: its eval has no metric {metric!r} (it has: {known})")
    value = float(value)
    if not math.isfinite(value):
        raise MixRunError(f"{where}: {metric} is {value} (the proxy diverged? see {ProxyLayout(where.parent).log})")
    return value
