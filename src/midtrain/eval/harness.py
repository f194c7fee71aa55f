"""lm-evaluation-harness on an HF export, with lm-eval's own model class and tasks (`pip install midtrain[lm-eval]`).

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): tasks run from local files — midtrain's built-in tasks
(eval/harness_tasks.py), the recipe's `eval.harness.include` directories of task YAMLs, or hub tasks whose datasets
are already in the local HF cache. The numbers are the ones `lm_eval --model hf --include_path ...` prints for the
same export (tests/eval/test_harness_cli.py). Requests are batched (`batch_size`): lm-eval sorts them by length, so
batches hold similar lengths. Metrics come back as `harness.<task>.<metric>` (a metric reported under several filters,
as gsm8k's strict and flexible matches, becomes `<metric>_<filter>`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "pip install 'midtrain[lm-eval]'"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextmanager
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def include_paths(include: Sequence[Path | str] = (), cache_dir: Path | None = None) -> list[str]:
    """The built-in task directory (written under the midtrain cache) followed by the recipe's."""
    from midtrain.data.tokenize import default_cache_dir
    from midtrain.eval.harness_tasks import builtin_tasks_dir

    return [str(builtin_tasks_dir(cache_dir or default_cache_dir())), *(str(p) for p in include)]


def unknown_tasks(tasks: Sequence[str], include: Sequence[Path | str] = ()) -> tuple[list[str], str | None]:
    """(tasks lm-eval does not know with these include paths, None), or ([], why) when lm-eval is not installed.
    For recipe checks: indexing every task YAML takes a few seconds."""
    if importlib.util.find_spec("lm_eval") is None:
        return [], f"lm-evaluation-harness is not installed ({INSTALL_HINT})"
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=include_paths(include)).all_tasks)
    return [t for t in tasks if t not in known and t != "humaneval"], None


def run_harness(checkpoint_dir: Path | None, tasks: Sequence[str], *, include: Sequence[Path | str] = (),
                limit: int | None = None, batch_size: int = 16, num_fewshot: int | None = None, seed: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, float], str | None]:
    """(metrics, None) on success; ({}, why) when it cannot run (not installed, no HF dir, a task's data missing)."""
    log = log or (lambda _: None)
    if importlib.util.find_spec("lm_eval") is None:
        return {}, f"lm-evaluation-harness is not installed ({INSTALL_HINT}); harness tasks {list(tasks)} not run"
    if checkpoint_dir is None or not (Path(checkpoint_dir) / "config.json").is_file():
        return {}, f"harness tasks need an HF checkpoint directory (got {checkpoint_dir}); not run"
    with offline():
        try:
            import lm_eval
            import torch
            from lm_eval.tasks import TaskManager

            log(f"harness: {', '.join(tasks)} on {checkpoint_dir} (batch {batch_size}"
                f"{f', {limit} examples per task' if limit else ''})")
            result = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(checkpoint_dir), "dtype": "float32"}, tasks=list(tasks),
                task_manager=TaskManager(include_path=include_paths(include)), limit=limit,
                num_fewshot=num_fewshot, batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
                random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
        except Exception as exc:  # noqa: BLE001 - anything from a third-party harness (mostly: a missing dataset)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            return {}, (f"harness tasks {list(tasks)} not run: {type(exc).__name__}: {first} (task data must be "
                        "local files or already in the HF cache; nothing is downloaded)")
    return harness_metrics(result or {}), None


def harness_metrics(result: dict) -> dict[str, float]:
    """`{"results": {task: {"acc,none": 0.5, "acc_stderr,none": ...}}}` -> {"harness.task.acc": 0.5}; a metric
    under several filters keeps each as `<metric>_<filter>`."""
    out: dict[str, float] = {}
    for task, values in (result.get("results") or {}).items():
        found: dict[str, dict[str, float]] = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or "stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(float(value)):
                found.setdefault(name, {})[filt] = float(value)
        for name, by_filter in found.items():
            for filt, value in by_filter.items():
                out[f"harness.{task}.{name if len(by_filter) == 1 else f'{name}_{filt}'}"] = value
    return out
