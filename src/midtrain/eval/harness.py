"""lm-evaluation-harness on an HF export: optional (the `lm_eval` package is not a dependency).

Runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): a task whose dataset is not already in the local cache is
skipped with a message instead of downloading. Metrics come back as `harness.<task>.<metric>`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

INSTALL_HINT = "pip install lm-eval"


def run_harness(checkpoint_dir: Path | None, tasks: Sequence[str], *, seed: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, float], str | None]:
    """(metrics, None) on success; ({}, why) when skipped (not installed, no HF dir, a task needs a download)."""
    log = log or (lambda _: None)
    if importlib.util.find_spec("lm_eval") is None:
        return {}, f"lm-evaluation-harness is not installed ({INSTALL_HINT}); harness tasks {list(tasks)} skipped"
    if checkpoint_dir is None or not (Path(checkpoint_dir) / "config.json").is_file():
        return {}, f"harness tasks need an HF checkpoint directory (got {checkpoint_dir}); skipped"
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    try:
        import lm_eval

        log(f"harness: {', '.join(tasks)} on {checkpoint_dir}")
        result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint_dir},dtype=float32",
                                         tasks=list(tasks), random_seed=seed, numpy_random_seed=seed,
                                         torch_random_seed=seed, batch_size=1)
    except Exception as exc:  # noqa: BLE001 - anything from a third-party harness (mostly: a missing dataset)
        return {}, (f"harness tasks {list(tasks)} skipped: {type(exc).__name__}: {str(exc)[:300]} "
                    "(datasets must already be in the local HF cache; nothing is downloaded)")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return harness_metrics(result or {}), None


def harness_metrics(result: dict) -> dict[str, float]:
    """`{"results": {task: {"acc,none": 0.5, "acc_stderr,none": ...}}}` -> {"harness.task.acc": 0.5}."""
    out: dict[str, float] = {}
    for task, values in (result.get("results") or {}).items():
        for key, value in values.items():
            name = key.split(",", 1)[0]
            if "stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(float(value)):
                out[f"harness.{task}.{name}"] = float(value)
    return out
