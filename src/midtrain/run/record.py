"""The run directory's record of what ran: recipe.yaml and plan.json, and the refusal to continue stages trained
under another recipe (unless told to, or unless the stage failed its gate and nothing after it started)."""

from __future__ import annotations

import json
import shutil

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
    for stage in plan.stages:
        recorded = recorded_fingerprint(layout, stage)
        if recorded and recorded != stage.fingerprint and may_retry_after_gate(layout, plan, stage):
            k = set_aside_failed_attempt(layout, stage.name)
            kept = layout.gate_failed_attempt(stage.name, k)[0][1]
            print(f"stage {stage.name!r} failed its gate and its recipe changed: the failed attempt is kept as "
                  f"{kept.name} (its export, checkpoints and evals); training the stage again", flush=True)
            continue
        if recorded and recorded != stage.fingerprint and not options.force_recipe_change:
            raise RunError(
                f"{layout.root}: stage {stage.name!r} was trained with a different recipe (fingerprint {recorded}, "
                f"now {stage.fingerprint}); use a new run_dir, or --force-recipe-change to continue anyway"
            )
    text = dump_recipe(recipe)
    if layout.recipe.exists() and layout.recipe.read_text() != text:
        k = 1
        while layout.previous_recipe(k).exists():
            k += 1
        shutil.copy2(layout.recipe, layout.previous_recipe(k))
    write_text_atomic(layout.recipe, text)
    write_text_atomic(layout.plan, json.dumps(plan.to_json(), indent=2))


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
