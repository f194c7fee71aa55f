"""`midtrain run`: turn a recipe into trained, evaluated, exported stages — resuming whatever is already done.

Per stage (midtrain.run.stage): start state -> before-eval -> train with periodic validation and checkpoints -> final
checkpoint -> HF export -> after-eval -> gate. A stage is finished when its after-eval exists; a re-run skips finished
stages and resumes the first unfinished one from its newest checkpoint.
"""

from __future__ import annotations

import contextlib

import transformers

from midtrain.config import Recipe
from midtrain.layout import RunLayout
from midtrain.plan import build_plan
from midtrain.report import write_report
from midtrain.run.branches import run_branches
from midtrain.run.context import RunContext, RunOptions
from midtrain.run.evaluate import GateFailed, check_gate, eval_outdated, reevaluate
from midtrain.run.preflight import preflight
from midtrain.run.record import record_run
from midtrain.run.setup import tokenize_all
from midtrain.run.stage import export_problem, run_stage, stage_finished
from midtrain.threads import apply_threads
from midtrain.train.distributed import barrier, init_distributed
from midtrain.train.precision import resolve_precision
from midtrain.train.preemption import Preempted, PreemptionGuard
from midtrain.train.runlock import RunLock


def run(recipe: Recipe, options: RunOptions | None = None) -> RunContext:
    options = options or RunOptions()
    transformers.utils.logging.disable_progress_bar()  # our own progress bars say what happens
    dist = init_distributed(recipe.distributed)
    plan = build_plan(recipe)
    checks = preflight(recipe, plan, world_size=dist.world_size, device=dist.device, options=options)
    checks.raise_for_problems()  # before the run dir, the lock or tokenizing: fail in seconds
    requested = options.threads if options.threads is not None else recipe.threads
    threads = apply_threads(requested) if requested is not None else None  # None: a library caller's own setting
    layout = RunLayout(recipe.run_dir)
    lock = RunLock(layout.root) if dist.is_main else contextlib.nullcontext()
    with lock, PreemptionGuard() as guard:
        if isinstance(lock, RunLock) and lock.took_over is not None:
            stale = lock.took_over.get("pid")
            print(f"note: took over a stale lock of pid {stale} (no such process)" if stale is not None else
                  f"note: replaced an unreadable lock file {lock.path} (left by a process killed while taking it)",
                  flush=True)
        if dist.is_main:
            record_run(recipe, plan, layout, options)
        barrier()
        log = (lambda line: print(line, flush=True)) if dist.is_main else None  # no context (console) yet
        sources = tokenize_all(recipe, checks.tokenizer, dist, layout.data, log=log)
        precision = resolve_precision(recipe.precision, dist.device)
        ctx = RunContext(recipe, plan, dist, layout, checks.tokenizer, sources,
                         [s.domain_name for s in recipe.sources], options, precision)
        ctx.print(f"precision: {precision} (recipe: {recipe.precision}; device: {dist.device})")
        if threads is not None:
            ctx.print(f"threads: {threads.threads} ({threads.why})")
        for warning in checks.warnings:
            ctx.print(f"warning: {warning}")
        try:
            for stage in plan.stages:
                run_or_skip(ctx, stage, guard)
                check_gate(ctx, stage)  # raises GateFailed: the run stops here, resumable
        except GateFailed:
            write_run_report(ctx)
            raise
        write_run_report(ctx)
    return ctx


def run_or_skip(ctx: RunContext, stage, guard: PreemptionGuard) -> None:
    """Trains an unfinished stage (as K souped branches where it has `seeds`); re-evaluates a finished one whose
    eval tasks changed."""
    finished = stage_finished(ctx.target(stage))
    problem = export_problem(ctx.target(stage)) if finished else None
    if finished and problem is None:
        ctx.print(f"stage {stage.name!r} already finished; skipping")
        if eval_outdated(ctx, stage):
            reevaluate(ctx, stage)
        return
    if problem is not None:  # the remedy: the stage's final checkpoint is exported (and evaluated) again
        ctx.print(f"warning: {problem}; exporting stage {stage.name!r} again from its final checkpoint")
    if guard.agreed(ctx.dist.device):  # a signal between stages: nothing to save, the last stage finished
        raise Preempted(guard.signal_name, stage.first_step)
    if ctx.recipe.stages[stage.index].seeds:
        run_branches(ctx, stage, guard)
    else:
        run_stage(ctx, stage, guard)
    barrier()


def write_run_report(ctx: RunContext) -> None:
    """report.md/html + plots at the end of a run (or where a gate stopped it); a failure here only warns."""
    if not ctx.dist.is_main:
        return
    try:
        out = write_report(ctx.run_dir)
        ctx.print(f"report: {out}")
    except Exception as exc:  # noqa: BLE001 - the run's results stand even if a plot cannot be drawn
        ctx.print(f"warning: could not write the report: {type(exc).__name__}: {exc}")
