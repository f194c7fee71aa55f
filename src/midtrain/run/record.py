"""The run directory's record of what ran: recipe.yaml and plan.json, and the refusal to continue stages trained
under another recipe (unless told to, or unless the stage failed its gate and nothing after it started)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from midtrain.config import Recipe, dump_recipe
from midtrain.io import write_text_atomic
from midtrain.layout import RunLayout
from midtrain.plan import Plan, StagePlan
from midtrain.run.context import RunError, RunOptions
from midtrain.run.evaluate import gate_failed_on_record, set_aside_failed_attempt
from midtrain.train import checkpoint as ckpt


def record_run(recipe: Recipe, plan: Plan, layout: RunLayout, options: RunOptions) -> None:
    """Records the recipe and plan (main rank); refuses to continue trained stages under a changed recipe."""
    layout.root.mkdir(parents=True, exist_ok=True)
    text = dump_recipe(recipe)
    for stage in plan.stages:
        recorded = recorded_fingerprint(layout, stage)
        if recorded and recorded != stage.fingerprint and may_retry_after_gate(layout, plan, stage):
            k = set_aside_failed_attempt(layout, stage.name)
            kept = layout.gate_failed_attempt(stage.name, k)[0][1]
            print(f"stage {stage.name!r} failed its gate and its recipe changed: the failed attempt is kept as "
                  f"{kept.name} (its export, checkpoints and evals); training the stage again", flush=True)
            continue
        if recorded and recorded != stage.fingerprint and not options.force_recipe_change:
            changed = changed_keys(layout.recipe, text)
            raise RunError(
                f"{layout.root}: stage {stage.name!r} was trained with a different recipe"
                + (f" (changed: {', '.join(changed)})" if changed else f" (fingerprint {recorded}, now "
                   f"{stage.fingerprint}: its data or tokenizer changed)")
                + "; use a new run_dir, or --force-recipe-change to continue anyway")
    if layout.recipe.exists() and layout.recipe.read_text() != text:
        k = 1
        while layout.previous_recipe(k).exists():
            k += 1
        shutil.copy2(layout.recipe, layout.previous_recipe(k))
    write_text_atomic(layout.recipe, text)
    write_text_atomic(layout.plan, json.dumps(plan.to_json(), indent=2))


def changed_keys(recorded_file: Path, text: str, limit: int = 8) -> list[str]:
    """`path.to.key (old -> new)` for each value that differs between the recorded recipe and this one."""
    try:
        old, new = yaml.safe_load(recorded_file.read_text()), yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return []
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) and "name" in x for x in a + b):
            a, b = {x["name"]: x for x in a}, {x["name"]: x for x in b}  # stages and sources by name
        if isinstance(a, dict) and isinstance(b, dict):
            for key in [*a, *(k for k in b if k not in a)]:
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            out.append(f"{path} ({_short(a)} -> {_short(b)})")

    for recipe in (old, new):  # where the run lives is not what it is (a moved run dir resumes)
        if isinstance(recipe, dict):
            recipe.pop("run_dir", None)
    walk(old, new, "")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def may_retry_after_gate(layout: RunLayout, plan: Plan, stage: StagePlan) -> bool:
    """A gate-failed stage may be trained again under a changed recipe if no later stage has started."""
    started = any(layout.stage_started(s.name) for s in plan.stages[stage.index + 1 :])
    return not started and gate_failed_on_record(layout, stage.name)


def recorded_fingerprint(layout: RunLayout, stage: StagePlan) -> str | None:
    """The fingerprint a stage was trained under: its export's record, else its newest checkpoint's."""
    info = layout.stage(stage.name).export_info
    if info.is_file():
        return json.loads(info.read_text()).get("fingerprint")
    latest = ckpt.latest_checkpoint(layout.stage(stage.name).checkpoints)
    return ckpt.read_trainer_state(latest).get("fingerprint") if latest else None
