"""`seeds: [1, 2, 3]`: K branches of one stage from the same start, each with its own data order, souped.

Each branch is a sub-run in `stages/<stage>/seed-<k>/` (checkpoints/, hf/, eval.json, metrics.jsonl: midtrain.layout)
trained by the ordinary stage code; only the order of the documents not yet consumed differs (BranchLoader). When
every branch is done, their exports are averaged uniformly (midtrain.merge.soup) into the stage's export
`stages/<stage>/hf/`: what the stage's after-eval and gate judge and what the next stage loads. A soup checkpoint
`checkpoints/<stage>/step-<N>/` (midtrain.train.state.average_checkpoints) carries the run on exactly as a plain
stage's final checkpoint does. Resumable: a finished branch is skipped, an interrupted one resumes.
"""

from __future__ import annotations

import json
import shutil

from midtrain.data.cursors import read_positions
from midtrain.io import write_json_atomic
from midtrain.merge.soup import merge_checkpoints
from midtrain.model import load_model
from midtrain.model.families import choose_attention
from midtrain.plan import StagePlan
from midtrain.run.context import RunContext, RunError, StageTarget, Starts
from midtrain.run.evaluate import evaluate_stage
from midtrain.run.export import export_stage
from midtrain.run.setup import heldout_batches, initial_model, previous_final, start_source
from midtrain.run.stage import run_stage, stage_finished
from midtrain.train import checkpoint as ckpt
from midtrain.train.callbacks import MetricsWriter
from midtrain.train.distributed import barrier
from midtrain.train.preemption import Preempted, PreemptionGuard
from midtrain.train.state import average_checkpoints
from midtrain.train.trainer import TrainerState


def branch_starts(cursors: dict[str, dict]) -> Starts:
    """Where each source's unconsumed documents begin, from the loader cursors a stage starts with."""
    return {name: position.first_unread() for name, position in read_positions(cursors).items()}


def branch_target(ctx: RunContext, stage: StagePlan, seed: int) -> StageTarget:
    cursors = previous_final(ctx, stage).source_cursors if stage.index else {}
    layout = ctx.layout.branch(stage.name, seed)
    metrics = MetricsWriter(layout.metrics, ctx.dist.is_main, ctx.recipe.log_every_steps)
    return StageTarget(layout, metrics, branch_seed=seed, starts=branch_starts(cursors))


def _check_fingerprints(ctx: RunContext, stage: StagePlan, targets: list[StageTarget]) -> None:
    for target in targets:
        info, latest = target.layout.export_info, ckpt.latest_checkpoint(target.layout.checkpoints)
        if info.is_file():
            recorded = json.loads(info.read_text()).get("fingerprint")
        else:
            recorded = ckpt.read_trainer_state(latest).get("fingerprint") if latest else None
        if recorded and recorded != stage.fingerprint and not ctx.options.force_recipe_change:
            raise RunError(f"{target.layout.dir}: branch seed {target.branch_seed} of stage {stage.name!r} was "
                           f"trained with a different recipe (fingerprint {recorded}, now {stage.fingerprint}); "
                           "use a new run_dir, or --force-recipe-change to continue anyway")


def run_branches(ctx: RunContext, stage: StagePlan, guard: PreemptionGuard | None = None) -> TrainerState:
    seeds = ctx.recipe.stages[stage.index].seeds
    targets = [branch_target(ctx, stage, seed) for seed in seeds]
    _check_fingerprints(ctx, stage, targets)
    heldout = heldout_batches(ctx, stage)
    layout = ctx.stage_layout(stage)
    start = TrainerState(stage_step=0, global_step=stage.first_step, global_tokens=stage.first_tokens)
    if not layout.eval_before.is_file():  # once for all branches: they share the start model
        model = initial_model(ctx, stage).to(ctx.dist.device)
        evaluate_stage(ctx, stage, model, heldout, "before", start, start_source(ctx, stage), layout.eval_before)
        ctx.metrics.write({"event": "stage_start", "step": start.global_step, "tokens": start.global_tokens,
                           "stage": stage.name, "init": stage.init, "lr": stage.lr_at_step(0), "seeds": seeds})
        del model
    for k, target in enumerate(targets, start=1):
        if stage_finished(target):
            ctx.print(f"stage {stage.name!r} branch seed-{target.branch_seed} already finished; skipping")
            continue
        if guard is not None and guard.agreed(ctx.dist.device):  # between branches: nothing in flight to save
            raise Preempted(guard.signal_name, stage.first_step)
        if ctx.dist.is_main:
            target.layout.dir.mkdir(parents=True, exist_ok=True)
        barrier()
        ctx.print(f"stage {stage.name!r}: branch seed-{target.branch_seed} ({k}/{len(seeds)})")
        run_stage(ctx, stage, guard, target)
        barrier()
    return _soup(ctx, stage, targets, heldout)


def _soup(ctx: RunContext, stage: StagePlan, targets: list[StageTarget], heldout) -> TrainerState:
    final = stage.first_step + stage.steps
    state = TrainerState(stage_step=stage.steps, global_step=final, global_tokens=stage.first_tokens + stage.tokens,
                         last_lr=stage.last_lr)
    layout = ctx.stage_layout(stage)
    work = layout.dir / "soup.tmp"
    if ctx.dist.is_main:
        # The checkpoint first: once the export and after-eval exist the stage counts as finished.
        average_checkpoints([t.layout.checkpoint(final) for t in targets], layout.checkpoints, final)
        merge_checkpoints([t.layout.export for t in targets], work)
    barrier()
    model = load_model(work, trust_remote_code=ctx.recipe.trust_remote_code)
    model.set_attn_implementation(choose_attention(model.config, ctx.recipe.attention).implementation)
    model.config.use_cache = False
    model = model.to(ctx.dist.device)
    export_stage(ctx, stage, model, state, layout.export)  # the soup with the run's probe and midtrain.json
    seeds = [t.branch_seed for t in targets]
    if ctx.dist.is_main:
        record = json.loads(layout.export_info.read_text())
        record["soup"] = {"seeds": seeds, "branches": [str(t.layout.export) for t in targets]}
        write_json_atomic(layout.export_info, record)
        shutil.rmtree(work, ignore_errors=True)
    ctx.print(f"stage {stage.name!r}: souped {len(targets)} branches (seeds {seeds}) -> {layout.export}")
    evaluate_stage(ctx, stage, model, heldout, "after", state, str(layout.export), layout.eval_after,
                   export_dir=layout.export)
    ctx.metrics.write({"event": "soup", "step": final, "tokens": state.global_tokens, "stage": stage.name,
                       "seeds": seeds})
    ctx.metrics.write({"event": "stage_end", "step": final, "tokens": state.global_tokens, "stage": stage.name,
                       "lr": state.last_lr})
    return state
