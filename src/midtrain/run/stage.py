"""One stage, trained: start state -> before-eval -> train with validation and checkpoints -> export -> after-eval.

A fresh start takes the previous stage's export, loader cursors and (per `init`) optimizer state and RNG; a resume
takes the stage's newest checkpoint whole (midtrain.train.state). The same code trains a stage and each seed branch
of a souped stage: a `StageTarget` says where it writes and how its loader orders documents.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from midtrain.data import PackedLoader
from midtrain.eval.heldout import heldout_metrics
from midtrain.eval.keys import MetricKey
from midtrain.model import forward_packed, unwrap_model
from midtrain.model.convert import load_optimizer_except_changed, with_router_aux_loss
from midtrain.model.families import choose_attention, describe_packing
from midtrain.model.head import resolve_loss_chunk_tokens
from midtrain.model.verify import CheckpointFileError, verify_export
from midtrain.plan import StagePlan
from midtrain.run.context import RunContext, StageTarget
from midtrain.run.evaluate import evaluate_stage
from midtrain.run.export import export_stage
from midtrain.run.setup import (
    GlobalSourceIds,
    heldout_batches,
    initial_model,
    log_conversion,
    make_loader,
    previous_final,
    start_source,
)
from midtrain.train import checkpoint as ckpt
from midtrain.train.averaging import WeightAverager
from midtrain.train.callbacks import (
    Every,
    ProgressBar,
    TensorBoardLogger,
    ThroughputMonitor,
    WandbLogger,
    has_row,
    truncate_metrics,
)
from midtrain.train.distributed import wrap_model
from midtrain.train.flops import is_dense, training_flops_per_token
from midtrain.train.gns import GradientNoiseScale
from midtrain.train.optim import build_optimizer
from midtrain.train.preemption import Preempted, PreemptionGuard, StopOnSignal
from midtrain.train.profiling import StepProfiler
from midtrain.train.rollback import DocumentLedger, Rollback
from midtrain.train.state import Saved, TrainingState
from midtrain.train.trainer import Trainer, TrainerState


@dataclass
class StageStart:
    """Where a stage's training begins: its model (not yet wrapped), loader, counters and held-out batches; the
    checkpoint it resumes (`resume`) or the previous stage's final checkpoint whose optimizer it takes."""

    model: torch.nn.Module
    loader: PackedLoader
    used: list[int]  # the recipe's indices of the sources the loader reads
    state: TrainerState
    heldout: list[dict]
    resume: Saved | None = None
    optimizer_from: Saved | None = None


def start_stage(ctx: RunContext, stage: StagePlan, target: StageTarget) -> StageStart:
    latest, rejected = ckpt.resume_point(target.layout.checkpoints, fallback=ctx.options.fallback_checkpoint)
    for problem in rejected:
        instead = f"resuming from {latest}" if latest else f"no checkpoint verifies: stage {stage.name!r} starts over"
        ctx.print(f"warning: {problem}; --fallback-checkpoint: {instead}")
    conversions: list = []
    model = initial_model(ctx, stage, resuming=latest is not None, conversions=conversions)
    config = model.config
    ctx.print(f"stage {stage.name!r}: {type(model).__name__}, {choose_attention(config, ctx.recipe.attention)}; "
              f"{describe_packing(config, stage.seq_len)}")
    loader, used = make_loader(ctx, stage, target)
    state = TrainerState(stage_step=0, global_step=stage.first_step, global_tokens=stage.first_tokens)
    start = StageStart(model, loader, used, state, heldout_batches(ctx, stage))
    if latest is not None:  # resume inside this stage: everything is restored once the optimizer exists
        start.resume = start.optimizer_from = Saved.read(latest)
        start.state = start.resume.trainer
        if ctx.dist.is_main:  # a later stage's rows stay: re-exporting a stage must not erase their history
            dropped = truncate_metrics(target.layout.metrics, start.state.global_step,
                                       keep_stages=later_stages(ctx, stage))
            target.metrics.write({"event": "resume", "step": start.state.global_step,
                                  "tokens": start.state.global_tokens, "stage": stage.name,
                                  "checkpoint": str(latest), "superseded_rows": dropped})
        ctx.print(f"resumed stage {stage.name!r} from step {start.state.global_step} ({latest})")
        return start
    if ctx.dist.is_main:
        truncate_metrics(target.layout.metrics, stage.first_step, keep_stages=later_stages(ctx, stage))
    torch.manual_seed(ctx.recipe.seed + stage.index)
    if stage.index > 0:
        previous = previous_final(ctx, stage)
        names = {s.name for s in ctx.recipe.sources}
        loader.load_source_cursors({k: v for k, v in previous.source_cursors.items() if k in names})
        if stage.init in ("weights+optimizer", "resume"):
            start.optimizer_from = previous
        if stage.init == "resume":
            ckpt.load_rng(previous.path)
    for report in conversions:  # the before-eval below measures the converted model
        log_conversion(ctx, target, stage, start.state, report)
    if not target.is_branch:  # a souped stage evaluates its start once for all branches (run.branches)
        evaluate_stage(ctx, stage, model.to(ctx.dist.device), start.heldout, "before", start.state,
                       start_source(ctx, stage), target.layout.eval_before)
    target.metrics.write({"event": "stage_start", "step": start.state.global_step,
                          "tokens": start.state.global_tokens, "stage": stage.name, "init": stage.init,
                          "lr": stage.lr_at_step(0)})
    return start


def later_stages(ctx: RunContext, stage: StagePlan) -> set[str]:
    """The stages after `stage` that will continue from state of their own (a checkpoint or an export) rather than
    train again: their rows in metrics.jsonl are history a resume of `stage` must keep."""
    return {s.name for s in ctx.plan.stages[stage.index + 1 :]
            if ckpt.latest_checkpoint(ctx.stage_layout(s).checkpoints) or ctx.stage_layout(s).export_info.is_file()}


def training_state(ctx: RunContext, stage: StagePlan, start: StageStart) -> TrainingState:
    """The model wrapped for the processes, its optimizer, and the stateful callbacks, restored when resuming."""
    recipe, stage_cfg = ctx.recipe, ctx.recipe.stages[stage.index]
    model = start.model
    if recipe.activation_checkpointing:  # before wrapping: FSDP2 shards the checkpointed layers as they are
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model.to(ctx.dist.device), recipe.distributed, ctx.dist)
    optimizer = build_optimizer(model, stage_cfg.optimizer, lr=stage.lr_at_step(start.state.stage_step))
    monitor = recipe.stage_monitor(stage.index)
    parts = [part for part in (
        GradientNoiseScale(monitor.gns_every_steps, monitor.gns_ema) if monitor.gns_every_steps else None,
        WeightAverager(stage_cfg.average, stage) if stage_cfg.average else None,
    ) if part is not None]
    state = TrainingState(model, optimizer, start.loader, stage.name, stage.fingerprint, parts)
    if start.resume is not None:  # weights, optimizer, RNG, loader and parts continue exactly where it left off
        state.restore(start.resume)
    elif start.optimizer_from is not None and stage_cfg.convert is not None:  # converted params restart moments
        load_optimizer_except_changed(start.optimizer_from.path / ckpt.OPTIM_FILE, model, optimizer)
    elif start.optimizer_from is not None:
        ckpt.load_optimizer(start.optimizer_from.path, model, optimizer)
    if recipe.compile:
        state.model = torch.compile(model)
    return state


def train_forward(ctx: RunContext, stage: StagePlan, state: TrainingState):
    """The forward the stage trains and validates with: the head chunked where the recipe asks or, under auto,
    where a micro-batch's logits are big."""
    tokens = state.loader.micro_batch * stage.seq_len
    chunk = resolve_loss_chunk_tokens(ctx.recipe.loss_chunk_tokens, state.model, tokens)
    return forward_packed if chunk is None else functools.partial(forward_packed, loss_chunk_tokens=chunk)


def build_trainer(ctx: RunContext, stage: StagePlan, target: StageTarget, start: StageStart,
                  state: TrainingState, guard: PreemptionGuard | None) -> Trainer:
    recipe, stage_cfg, model = ctx.recipe, ctx.recipe.stages[stage.index], state.model
    forward = train_forward(ctx, stage, state)
    saved_step = [-1]
    final_step = stage.first_step + stage.steps

    def save(trainer: Trainer) -> None:
        saved_step[0] = trainer.state.global_step
        state.save(target.layout.checkpoints, trainer.state, trainer.forced_skips, is_main=ctx.dist.is_main,
                   keep_last=recipe.checkpoint.keep_last, protect=(final_step,))

    def validate(trainer: Trainer) -> None:
        metrics = heldout_metrics(model, forward, start.heldout, ctx.domains, device=ctx.dist.device,
                                  precision=ctx.precision)
        st = trainer.state
        row = {"event": "val", "step": st.global_step, "tokens": st.global_tokens, "stage": stage.name,
               "stage_step": st.stage_step, "stage_tokens": st.stage_step * stage.batch_tokens}
        row.update({("val_" + k): v for k, v in metrics.items() if MetricKey.parse(k).task == "loss"})
        target.metrics.write(row)
        if ctx.options.progress:  # the held-out loss is the number a user watches for forgetting
            domains = ", ".join(f"{k.removeprefix('val_loss.')} {v:.4f}" for k, v in row.items()
                                if k.startswith("val_loss."))
            ctx.print(f"{stage.name} val step {st.global_step}: loss {row.get('val_loss', float('nan')):.4f}"
                      + (f" ({domains})" if domains else ""))

    ledger = DocumentLedger(GlobalSourceIds(state.loader, start.used), state.loader)  # a skipped batch's documents
    # GNS edits the row the metrics writer logs; the averager updates before a checkpoint saves it.
    callbacks = [ledger, *state.parts, target.metrics, Every(stage_cfg.eval.every_tokens, validate),
                 Every(recipe.checkpoint.every_tokens, save, at_end=True)]
    if is_dense(unwrap_model(model).config):  # model FLOP/s and MFU in the train rows, before the writer logs them
        monitor = ThroughputMonitor(training_flops_per_token(model, stage.seq_len))
        callbacks.insert(callbacks.index(target.metrics), monitor)
    callbacks += optional_loggers(ctx, stage)
    trainer = Trainer(
        model=model, optimizer=state.optimizer, loader=ledger, stage=stage,
        forward=with_router_aux_loss(model, forward), dist=ctx.dist, domains=ctx.domains, precision=ctx.precision,
        grad_clip=stage_cfg.optimizer.grad_clip, callbacks=callbacks, state=start.state,
        skip_nonfinite=recipe.step_guard.skip_nonfinite, spike_factor=recipe.step_guard.spike_factor,
        forced_skips=start.resume.forced_skips if start.resume is not None else {},
    )
    if recipe.step_guard.on_fault == "rollback":
        trainer.on_fault = Rollback(target.layout.checkpoints, state, ledger, target.metrics, ctx.dist, stage.name,
                                    recipe.step_guard.max_rollbacks)
    if guard is not None:  # after the periodic save, so a step saved by both is written once
        trainer.callbacks.append(StopOnSignal(guard, save, lambda: saved_step[0]))
    return trainer


def optional_loggers(ctx: RunContext, stage: StagePlan) -> list:
    """Progress bar, TensorBoard, W&B and the profiler, as the run's options ask."""
    out: list = []
    if ctx.options.progress:
        out.append(ProgressBar(ctx.dist.is_main, ctx.options.console))
    if ctx.options.tensorboard:
        out.append(TensorBoardLogger(ctx.layout.tensorboard, ctx.dist.is_main))
    if ctx.options.wandb:
        out.append(WandbLogger(ctx.run_dir, ctx.dist.is_main, name=f"{ctx.run_dir.name}-{stage.name}"))
    if ctx.options.profile_steps is not None:
        out.append(StepProfiler(*ctx.options.profile_steps, ctx.layout.profile, ctx.dist.rank))
    return out


def finish_stage(ctx: RunContext, stage: StagePlan, target: StageTarget, state: TrainingState,
                 counters: TrainerState, heldout: list[dict]) -> None:
    """Exports and evaluates the stage's end (the raw weights too, where the stage averages them)."""
    model, layout = state.model, target.layout
    averager = next((p for p in state.parts if isinstance(p, WeightAverager)), None)
    if averager is not None and averager.count:  # raw weights: exported and evaluated beside the averaged export
        export_stage(ctx, stage, model, counters, layout.raw_export)
        evaluate_stage(ctx, stage, model, heldout, "raw", counters, str(layout.raw_export), layout.eval_raw,
                       export_dir=layout.raw_export)
        averager.copy_to(model)
    export_stage(ctx, stage, model, counters, layout.export)
    evaluate_stage(ctx, stage, model, heldout, "after", counters, str(layout.export), layout.eval_after,
                   export_dir=layout.export)
    # A stage exported again (its export was damaged or removed) has ended before: its history keeps one stage_end.
    event = "reexport" if has_row(layout.metrics, "stage_end", stage.name) else "stage_end"
    target.metrics.write({"event": event, "step": counters.global_step, "tokens": counters.global_tokens,
                          "stage": stage.name, "lr": counters.last_lr})


def run_stage(ctx: RunContext, stage: StagePlan, guard: PreemptionGuard | None = None,
              target: StageTarget | None = None) -> TrainerState:
    """Trains `stage` (or the branch `target` names) from its start or newest checkpoint to its export."""
    target = target or ctx.target(stage)
    start = start_stage(ctx, stage, target)
    state = training_state(ctx, stage, start)
    trainer = build_trainer(ctx, stage, target, start, state, guard)
    counters = trainer.fit()  # a no-op when resuming from the stage's final checkpoint (killed while exporting)
    if trainer.should_stop and guard is not None and guard.received is not None:
        target.metrics.write({"event": "preempted", "step": counters.global_step, "tokens": counters.global_tokens,
                              "stage": stage.name, "signal": guard.signal_name})
        raise Preempted(guard.signal_name, counters.global_step)
    finish_stage(ctx, stage, target, state, counters, start.heldout)
    return counters


def stage_finished(target: StageTarget) -> bool:
    return target.layout.eval_after.is_file() and target.layout.export_info.is_file()


def export_problem(target: StageTarget) -> str | None:
    """Why a finished stage's export cannot be used as it is (a file changed since it was written), or None."""
    try:
        verify_export(target.layout.export)
    except CheckpointFileError as exc:
        return str(exc)
    return None
