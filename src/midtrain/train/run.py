"""`midtrain run`: turn a recipe into trained, evaluated, exported stages — resuming whatever is already done.

Per stage: start state (base, previous stage's export, optimizer state, loader cursors) -> before-eval -> train with
periodic validation and checkpoints -> final checkpoint -> HF export -> after-eval. A stage is finished when its
after-eval exists; a re-run skips finished stages and resumes the first unfinished one from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from midtrain.config import Recipe, dump_recipe
from midtrain.context import apply_rope, stage_rope_issues
from midtrain.data import PackedLoader, TokenizedSource, byte_tokenizer, default_cache_dir
from midtrain.data.mixture import source_buckets
from midtrain.eval.heldout import heldout_metrics, pack_documents
from midtrain.io import write_text_atomic
from midtrain.model import (
    build_model,
    forward_packed,
    load_model,
    load_tokenizer,
    preset_config,
    save_hf_checkpoint,
    unwrap_model,
)
from midtrain.model.convert import with_router_aux_loss
from midtrain.model.head import resolve_loss_chunk_tokens
from midtrain.plan import Plan, StagePlan, build_plan
from midtrain.train import checkpoint as ckpt
from midtrain.train import stage_eval
from midtrain.train.averaging import FILE as AVERAGE_FILE
from midtrain.train.averaging import WeightAverager, raw_export_dir
from midtrain.train.callbacks import (
    Every,
    MetricsWriter,
    ProgressBar,
    TensorBoardLogger,
    ThroughputMonitor,
    WandbLogger,
    truncate_metrics,
)
from midtrain.train.distributed import DistInfo, barrier, init_distributed, wrap_model
from midtrain.train.flops import is_dense, training_flops_per_token
from midtrain.train.gns import GradientNoiseScale
from midtrain.train.optim import build_optimizer
from midtrain.train.precision import resolve_precision
from midtrain.train.preemption import Preempted, PreemptionGuard, StopOnSignal
from midtrain.train.profiling import StepProfiler
from midtrain.train.rollback import DocumentLedger, Rollback, forced_skips_of
from midtrain.train.runlock import RunLock
from midtrain.train.trainer import Trainer, TrainerState

log = logging.getLogger("midtrain")
PROBE_FILE = "midtrain_probe.safetensors"


class RunError(Exception):
    """A run cannot proceed (changed recipe over trained stages, missing previous state, ...)."""


@dataclass
class RunOptions:
    force_recipe_change: bool = False
    tensorboard: bool = False
    wandb: bool = False  # offline W&B (`wandb sync` later); needs the wandb package
    console: object | None = None  # a rich Console for progress bars
    progress: bool = True
    override_gates: tuple[str, ...] = ()  # stages whose failed gate is accepted (`--override-gate`)
    fallback_checkpoint: bool = False  # a corrupted newest checkpoint: resume from the previous good one
    profile_steps: tuple[int, int] | None = None  # global steps A..B traced by torch.profiler into RUN/profile/


@dataclass
class RunContext:
    recipe: Recipe
    plan: Plan
    dist: DistInfo
    run_dir: Path
    tokenizer: object
    sources: list[TokenizedSource]
    domains: list[str]
    options: RunOptions
    precision: str  # resolved: fp32 or bf16-mixed
    metrics: MetricsWriter = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", self.dist.is_main, self.recipe.log_every_steps)

    def stage_dir(self, stage: StagePlan) -> Path:
        return self.run_dir / "stages" / stage.name

    def export_dir(self, stage: StagePlan) -> Path:
        return self.stage_dir(stage) / "hf"

    def ckpt_root(self, stage: StagePlan) -> Path:
        return self.run_dir / "checkpoints" / stage.name

    def eval_path(self, stage: StagePlan, when: str) -> Path:
        if when == "raw":  # the un-averaged weights of a stage with `average` (docs/AVERAGING.md)
            return self.run_dir / "eval" / f"{stage.name}.raw.json"
        return self.run_dir / "eval" / (f"{stage.name}-before.json" if when == "before" else f"{stage.name}.json")

    def evaluates_start(self, stage: StagePlan) -> bool:
        """Whether a fresh start of `stage` writes its before-eval (a seed branch leaves that to its stage)."""
        return True

    def new_loader(self, stage: StagePlan, sources: list, weights: list, **kwargs) -> PackedLoader:
        """The stage's loader (a seed branch reorders its documents: midtrain.train.branches)."""
        return PackedLoader(sources, weights, seed=self.recipe.seed, **kwargs)


# --------------------------------------------------------------------------- set-up


def resolve_tokenizer(recipe: Recipe):
    if recipe.tokenizer == "bytes":
        return byte_tokenizer()
    if recipe.tokenizer:
        return load_tokenizer(recipe.tokenizer)
    if recipe.base.startswith("preset:"):
        raise RunError("a preset base has no tokenizer: set `tokenizer:` (a local dir, or `bytes`)")
    return load_tokenizer(_base_path(recipe), allow_hub=recipe.base.startswith("hub:"))


def _base_path(recipe: Recipe) -> str:
    return recipe.base.removeprefix("hub:")


def _prepare_run_dir(recipe: Recipe, plan: Plan, run_dir: Path, options: RunOptions, is_main: bool) -> None:
    """Records the recipe; refuses to continue trained stages under a changed recipe unless told to."""
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in plan.stages:
        recorded = _recorded_fingerprint(run_dir, stage)
        if recorded and recorded != stage.fingerprint and _may_retry_after_gate(run_dir, plan, stage):
            k = stage_eval.set_aside_failed_attempt(run_dir, stage.name)
            print(f"stage {stage.name!r} failed its gate and its recipe changed: the failed attempt is kept as "
                  f"*.gate-failed-{k}; training the stage again", flush=True)
            continue
        if recorded and recorded != stage.fingerprint and not options.force_recipe_change:
            raise RunError(
                f"{run_dir}: stage {stage.name!r} was trained with a different recipe (fingerprint {recorded}, "
                f"now {stage.fingerprint}); use a new run_dir, or --force-recipe-change to continue anyway"
            )
    text = dump_recipe(recipe)
    recipe_file = run_dir / "recipe.yaml"
    if recipe_file.exists() and recipe_file.read_text() != text:
        k = 1
        while (run_dir / f"recipe.prev-{k}.yaml").exists():
            k += 1
        shutil.copy2(recipe_file, run_dir / f"recipe.prev-{k}.yaml")
    write_text_atomic(recipe_file, text)
    write_text_atomic(run_dir / "plan.json", json.dumps(plan.to_json(), indent=2))


def _may_retry_after_gate(run_dir: Path, plan: Plan, stage: StagePlan) -> bool:
    """A gate-failed stage may be trained again under a changed recipe if no later stage has started."""
    later = plan.stages[stage.index + 1 :]
    started = any((run_dir / d / s.name).exists() for s in later for d in ("stages", "checkpoints"))
    return not started and stage_eval.gate_failed_on_record(run_dir, stage.name)


def _recorded_fingerprint(run_dir: Path, stage: StagePlan) -> str | None:
    info = run_dir / "stages" / stage.name / "hf" / "midtrain.json"
    if info.is_file():
        return json.loads(info.read_text()).get("fingerprint")
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints" / stage.name)
    return ckpt.read_trainer_state(latest).get("fingerprint") if latest else None


def _tokenize_all(recipe: Recipe, tokenizer, dist: DistInfo) -> list[TokenizedSource]:
    """Rank 0 fills the shared cache first; the other ranks then read it (no duplicate work, no races)."""
    from midtrain.data.prepare import apply_special_tokens, check_epoch_caps, tokenize_recipe_sources

    cache = default_cache_dir()
    apply_special_tokens(recipe, tokenizer)  # every rank: the tokenizer object is per process

    def tokenize_every_source(report_dir: Path | None) -> list[TokenizedSource]:
        return tokenize_recipe_sources(recipe, tokenizer, cache_dir=cache, report_dir=report_dir)

    sources = tokenize_every_source(Path(recipe.run_dir) / "data") if dist.is_main else None
    barrier()
    sources = sources if sources is not None else tokenize_every_source(None)
    problems = check_epoch_caps(recipe, sources)
    if problems:
        raise RunError("\n".join(problems) + "\n(raise max_epochs, add data, or lower the weights)")
    return sources


# --------------------------------------------------------------------------- model / state for a stage


def _initial_model(ctx: RunContext, stage: StagePlan, *, resuming: bool = False, conversions: list | None = None):
    """The stage's starting weights: base, previous export, or a fresh init; then its conversion and RoPE setting.

    A stage with `convert` trains the converted model; when `resuming`, only the converted architecture is built (its
    own checkpoint holds the weights), and each conversion's report is appended to `conversions`.
    """
    recipe, seed = ctx.recipe, ctx.recipe.seed + stage.index
    if stage.index == 0 or stage.init == "scratch":
        if recipe.base.startswith("preset:"):
            config = preset_config(
                recipe.base.removeprefix("preset:"),
                vocab_size=len(ctx.tokenizer),
                bos_token_id=ctx.tokenizer.bos_token_id,
                eos_token_id=ctx.tokenizer.eos_token_id,
                pad_token_id=ctx.tokenizer.pad_token_id,
            )
            model = build_model(config, seed=seed)
        elif stage.init == "scratch":
            model = build_model(load_model(_base_path(recipe), allow_hub=recipe.base.startswith("hub:")).config, seed)
        else:
            model = load_model(_base_path(recipe), allow_hub=recipe.base.startswith("hub:"))
    else:
        previous = ctx.export_dir(ctx.plan.stages[stage.index - 1])
        model = load_model(previous)
    if recipe.special_tokens:  # tokens the recipe added: grow the base's embeddings (seeded: resumable)
        from midtrain.data.instruct import resize_embeddings

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resize_embeddings(model, len(ctx.tokenizer))
    if model.get_input_embeddings().num_embeddings < len(ctx.tokenizer):
        raise RunError(
            f"tokenizer has {len(ctx.tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    spec = recipe.stages[stage.index].convert
    if spec is not None:  # docs/CONVERSION.md
        from midtrain.model.convert import convert_model, converted_skeleton

        if resuming:
            model = converted_skeleton(model, spec, seed=seed)
        else:
            probe = _heldout_batches(ctx, stage)[:1]
            model, report = convert_model(model, spec, seed=seed, probe=probe[0] if probe else None)
            if conversions is not None:
                conversions.append(report)
    apply_rope(model, recipe.stages[stage.index].rope)
    model.set_attn_implementation(recipe.attention)
    model.config.use_cache = False
    return model


def _previous_final(ctx: RunContext, stage: StagePlan) -> Path:
    prev = ctx.plan.stages[stage.index - 1]
    path = ctx.ckpt_root(prev) / f"step-{prev.first_step + prev.steps}"
    if not (path / ckpt.MANIFEST).is_file():
        raise RunError(f"stage {stage.name!r} (init: {stage.init}) needs {path}, which is missing or incomplete")
    return path


def _make_loader(ctx: RunContext, stage: StagePlan) -> tuple[PackedLoader, list[int]]:
    names = [s.name for s in ctx.recipe.sources]
    used = [names.index(n) for n in stage.mixture]
    loader = ctx.new_loader(
        stage,
        [ctx.sources[i] for i in used],
        [stage.mixture[names[i]] for i in used],
        seq_len=stage.seq_len,
        global_batch_seqs=stage.seqs_per_step,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        micro_batch=ctx.recipe.stages[stage.index].batch.micro,
        split_documents=ctx.recipe.stages[stage.index].data.split_documents,
        length_buckets=[source_buckets(ctx.recipe.stages[stage.index].data, ctx.sources[i]) for i in used],
    )
    return loader, used


class _GlobalSourceIds:
    """Maps the loader's per-stage source indices to the recipe's source list (what metrics are keyed by)."""

    def __init__(self, loader: PackedLoader, used: list[int]):
        self.loader = loader
        self.lookup = torch.tensor([*used, -1])  # index -1 (padding) maps to -1

    def next_step(self):
        steps = self.loader.next_step()
        for mb in steps:
            mb["source_ids"] = self.lookup[mb["source_ids"]]
        return steps


# --------------------------------------------------------------------------- evaluation and export


def _heldout_batches(ctx: RunContext, stage: StagePlan) -> list[dict]:
    max_docs = ctx.recipe.stages[stage.index].eval.max_docs
    # instruction sources carry their loss mask: held-out loss scores response tokens only, as training does
    docs = [(d, i, m) for i, s in enumerate(ctx.sources)
            for d, m in zip(s.holdout_docs()[:max_docs], s.holdout_masks()[:max_docs])]
    return pack_documents(docs, stage.seq_len) if docs else []


def _evaluate(ctx: RunContext, stage: StagePlan, model, batches, when: str, state: TrainerState, source: str) -> None:
    """The stage's eval tasks on its start model (before) or its HF export (after): eval/<stage>[-before].json."""
    export = ctx.export_dir(stage) if when == "after" else None
    stage_eval.evaluate_stage(ctx, stage, model, batches, when, state.global_step, state.global_tokens, source,
                              export_dir=export)


def _reevaluate(ctx: RunContext, stage: StagePlan) -> None:
    """A finished stage whose recipe now lists other eval tasks/lengths: evaluate its start and end again."""
    print_main(ctx, f"stage {stage.name!r}: eval tasks changed; evaluating its start and end checkpoints again")
    heldout = _heldout_batches(ctx, stage)
    for when in ("before", "after"):
        old = json.loads(ctx.eval_path(stage, when).read_text()) if ctx.eval_path(stage, when).is_file() else {}
        step = old.get("step", stage.first_step if when == "before" else stage.first_step + stage.steps)
        state = TrainerState(stage_step=0, global_step=step, global_tokens=old.get("tokens", 0))
        model = _initial_model(ctx, stage) if when == "before" else load_model(ctx.export_dir(stage))
        source = old.get("checkpoint", str(ctx.export_dir(stage)))
        _evaluate(ctx, stage, model.to(ctx.dist.device), heldout, when, state, source)


def _write_report(ctx: RunContext) -> None:
    """report.md/html + plots at the end of a run (or where a gate stopped it); a failure here only warns."""
    if not ctx.dist.is_main:
        return
    try:
        from midtrain.report import write_report

        out = write_report(ctx.run_dir)
        print_main(ctx, f"report: {out}")
    except Exception as exc:  # noqa: BLE001 - the run's results stand even if a plot cannot be drawn
        print_main(ctx, f"warning: could not write the report: {type(exc).__name__}: {exc}")


def _export(ctx: RunContext, stage: StagePlan, model, state: TrainerState, out: Path | None = None) -> None:
    """Collective: gathers full weights (FSDP), rank 0 writes the HF checkpoint plus a probe for round-trip checks."""
    weights = ckpt.model_state(model)
    if not ctx.dist.is_main:
        barrier()
        return
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    plain = build_model(unwrap_model(model).config, seed=0)
    plain.load_state_dict(weights, strict=False)
    plain.eval()
    probe_ids = torch.arange(min(64, stage.seq_len)).remainder(len(ctx.tokenizer)).unsqueeze(0)
    with torch.no_grad():
        probe_logits = plain(input_ids=probe_ids, use_cache=False).logits.float()
    extra = {
        "stage": stage.name,
        "global_step": state.global_step,
        "tokens": state.global_tokens,
        "last_lr": state.last_lr,
        "fingerprint": stage.fingerprint,
    }
    target = out or ctx.export_dir(stage)
    try:
        out = save_hf_checkpoint(plain, ctx.tokenizer, target, extra=extra)
        save_file({"input_ids": probe_ids, "logits": probe_logits}, str(out / PROBE_FILE))
    except (OSError, RuntimeError, SafetensorError) as exc:  # e.g. a full disk: say so instead of a traceback
        temps = sorted(target.parent.glob(f"{target.name}.tmp-*"))
        reason = ckpt.write_error(exc, temps[-1] if temps else target.parent)
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.CheckpointError(
            f"{reason} while exporting stage {stage.name!r} to {target}; the partial export was removed and the "
            "stage's final checkpoint is intact; free space and run the same command to export again") from None
    barrier()


# --------------------------------------------------------------------------- the stage loop


def run_stage(ctx: RunContext, stage: StagePlan, guard: PreemptionGuard | None = None) -> TrainerState:
    recipe, dist, stage_cfg = ctx.recipe, ctx.dist, ctx.recipe.stages[stage.index]
    latest, rejected = ckpt.resume_point(ctx.ckpt_root(stage), fallback=ctx.options.fallback_checkpoint)
    for problem in rejected:
        instead = f"resuming from {latest}" if latest else f"no checkpoint verifies: stage {stage.name!r} starts over"
        print_main(ctx, f"warning: {problem}; --fallback-checkpoint: {instead}")
    conversions: list = []
    model = _initial_model(ctx, stage, resuming=latest is not None, conversions=conversions)
    loader, used = _make_loader(ctx, stage)
    state = TrainerState(stage_step=0, global_step=stage.first_step, global_tokens=stage.first_tokens)
    optimizer_from: Path | None = None
    heldout = _heldout_batches(ctx, stage)

    if latest is not None:  # resume inside this stage
        saved = ckpt.read_trainer_state(latest)
        ckpt.load_weights(latest, model)
        loader.load_state_dict(saved["loader"])
        state = TrainerState(**saved["trainer"])
        optimizer_from = latest
        ckpt.load_rng(latest)
        if dist.is_main:
            dropped = truncate_metrics(ctx.run_dir / "metrics.jsonl", state.global_step)
            ctx.metrics.write({"event": "resume", "step": state.global_step, "tokens": state.global_tokens,
                               "stage": stage.name, "checkpoint": str(latest), "superseded_rows": dropped})
        print_main(ctx, f"resumed stage {stage.name!r} from step {state.global_step} ({latest})")
    else:
        if dist.is_main:
            truncate_metrics(ctx.run_dir / "metrics.jsonl", stage.first_step)
        torch.manual_seed(recipe.seed + stage.index)
        if stage.index > 0:
            previous = _previous_final(ctx, stage)
            cursors = ckpt.read_trainer_state(previous)["loader_cursors"]
            loader.load_source_cursors({k: v for k, v in cursors.items() if k in {s.name for s in recipe.sources}})
            if stage.init in ("weights+optimizer", "resume"):
                optimizer_from = previous
            if stage.init == "resume":
                ckpt.load_rng(previous)
        source = str(ctx.export_dir(ctx.plan.stages[stage.index - 1])) if stage.index else recipe.base
        for report in conversions:  # the before-eval below measures the converted model
            _log_conversion(ctx, stage, state, report)
        if ctx.evaluates_start(stage):
            _evaluate(ctx, stage, model.to(dist.device), heldout, "before", state, source)
        ctx.metrics.write({"event": "stage_start", "step": state.global_step, "tokens": state.global_tokens,
                           "stage": stage.name, "init": stage.init, "lr": stage.lr_at_step(0)})

    if recipe.activation_checkpointing:  # before wrapping: FSDP2 shards the checkpointed layers as they are
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model.to(dist.device), recipe.distributed, dist)
    optimizer = build_optimizer(model, stage_cfg.optimizer, lr=stage.lr_at_step(state.stage_step))
    if optimizer_from is not None and stage_cfg.convert is not None and latest is None:
        from midtrain.model.convert import load_optimizer_except_changed  # converted params restart their moments

        load_optimizer_except_changed(optimizer_from / ckpt.OPTIM_FILE, model, optimizer)
    elif optimizer_from is not None:
        ckpt.load_optimizer(optimizer_from, model, optimizer)
    if recipe.compile:
        model = torch.compile(model)
    gns_every = recipe.stage_monitor(stage.index).gns_every_steps
    gns = GradientNoiseScale(gns_every, recipe.stage_monitor(stage.index).gns_ema) if gns_every else None
    averager = WeightAverager(stage_cfg.average, stage) if stage_cfg.average else None
    if latest is not None:  # their state continues exactly where the checkpoint left it
        if gns is not None:
            gns.load_state_dict(saved.get("gns"))
        if averager is not None:
            averager.load(latest, model, saved.get("average"))

    saved_step = [-1]

    def save(trainer: Trainer) -> None:
        st = trainer.state
        saved_step[0] = st.global_step
        trainer_json = {
            "trainer": vars(st).copy(),
            "loader": loader.state_dict(),
            "loader_cursors": loader.source_cursors(),
            "fingerprint": stage.fingerprint,
            "stage": stage.name,
            **({"gns": gns.state_dict()} if gns is not None else {}),
            **({"average": averager.state()} if averager is not None else {}),
            "forced_skips": {str(k): v for k, v in trainer.forced_skips.items()},  # batches a rollback marked
        }
        final_step = stage.first_step + stage.steps
        ckpt.save_checkpoint(ctx.ckpt_root(stage), st.global_step, model, optimizer, trainer_json,
                             is_main=dist.is_main, keep_last=recipe.checkpoint.keep_last, protect=(final_step,),
                             extra_tensors={AVERAGE_FILE: averager.tensors()} if averager and averager.count else None)

    train_forward = forward_packed
    # chunked head + loss (validation too) where the recipe asks or, under auto, where a micro-batch's logits are big
    chunk = resolve_loss_chunk_tokens(recipe.loss_chunk_tokens, model, loader.micro_batch * stage.seq_len)
    if chunk is not None:
        train_forward = functools.partial(forward_packed, loss_chunk_tokens=chunk)

    def validate(trainer: Trainer) -> None:
        metrics = heldout_metrics(model, train_forward, heldout, ctx.domains, device=dist.device,
                                  precision=ctx.precision)
        st = trainer.state
        row = {"event": "val", "step": st.global_step, "tokens": st.global_tokens, "stage": stage.name,
               "stage_step": st.stage_step, "stage_tokens": st.stage_step * stage.batch_tokens}
        row.update({("val_" + k): v for k, v in metrics.items() if k.startswith("loss")})
        ctx.metrics.write(row)

    ledger = DocumentLedger(_GlobalSourceIds(loader, used), loader)  # names a skipped batch's documents
    # GNS edits the row the metrics writer logs; the averager updates before a checkpoint saves it.
    callbacks = [ledger, *(cb for cb in (gns, averager) if cb is not None), ctx.metrics,
                 Every(stage_cfg.eval.every_tokens, validate),
                 Every(recipe.checkpoint.every_tokens, save, at_end=True)]
    if is_dense(unwrap_model(model).config):  # model FLOP/s and MFU in the train rows, before the writer logs them
        monitor = ThroughputMonitor(training_flops_per_token(model, stage.seq_len))
        callbacks.insert(callbacks.index(ctx.metrics), monitor)
    if ctx.options.progress:
        callbacks.append(ProgressBar(dist.is_main, ctx.options.console))
    if ctx.options.tensorboard:
        callbacks.append(TensorBoardLogger(ctx.run_dir / "tensorboard", dist.is_main))
    if ctx.options.wandb:
        callbacks.append(WandbLogger(ctx.run_dir, dist.is_main, name=f"{ctx.run_dir.name}-{stage.name}"))
    if ctx.options.profile_steps is not None:
        callbacks.append(StepProfiler(*ctx.options.profile_steps, ctx.run_dir / "profile", dist.rank))
    trainer = Trainer(
        model=model, optimizer=optimizer, loader=ledger, stage=stage,
        forward=with_router_aux_loss(model, train_forward), dist=dist, domains=ctx.domains, precision=ctx.precision,
        grad_clip=stage_cfg.optimizer.grad_clip, callbacks=callbacks, state=state,
        skip_nonfinite=recipe.step_guard.skip_nonfinite, spike_factor=recipe.step_guard.spike_factor,
        forced_skips=forced_skips_of(saved) if latest is not None else {},
    )
    if recipe.step_guard.on_fault == "rollback":
        trainer.on_fault = Rollback(ctx.ckpt_root(stage), loader, ledger, ctx.metrics, dist, stage.name,
                                    recipe.step_guard.max_rollbacks)
    if guard is not None:  # after the periodic save, so a step saved by both is written once
        trainer.callbacks.append(StopOnSignal(guard, save, lambda: saved_step[0]))
    state = trainer.fit()  # a no-op when resuming from the stage's final checkpoint (killed while exporting)
    if trainer.should_stop and guard is not None and guard.received is not None:
        ctx.metrics.write({"event": "preempted", "step": state.global_step, "tokens": state.global_tokens,
                           "stage": stage.name, "signal": guard.signal_name})
        raise Preempted(guard.signal_name, state.global_step)
    if averager is not None and averager.count:  # raw weights: exported and evaluated beside the averaged export
        raw = raw_export_dir(ctx.export_dir(stage))
        _export(ctx, stage, model, state, out=raw)
        stage_eval.evaluate_stage(ctx, stage, model, heldout, "raw", state.global_step, state.global_tokens,
                                  str(raw), export_dir=raw)
        averager.copy_to(model)
    _export(ctx, stage, model, state)
    _evaluate(ctx, stage, model, heldout, "after", state, str(ctx.export_dir(stage)))
    ctx.metrics.write({"event": "stage_end", "step": state.global_step, "tokens": state.global_tokens,
                       "stage": stage.name, "lr": state.last_lr})
    return state


def print_main(ctx: RunContext, message: str) -> None:
    if ctx.dist.is_main:
        if ctx.options.console is not None:
            ctx.options.console.print(message)
        else:
            print(message, flush=True)


def stage_finished(ctx: RunContext, stage: StagePlan) -> bool:
    return ctx.eval_path(stage, "after").is_file() and (ctx.export_dir(stage) / "midtrain.json").is_file()


def _check_batch_splits(recipe: Recipe, plan: Plan, world_size: int) -> None:
    for stage in plan.stages:
        micro = recipe.stages[stage.index].batch.micro
        per_rank, rest = divmod(stage.seqs_per_step, world_size)
        if rest or (micro and per_rank % micro):
            raise RunError(
                f"stage {stage.name!r}: {stage.seqs_per_step} sequences per step (batch.tokens / seq_len) must split "
                f"evenly over {world_size} ranks" + (f" into micro-batches of {micro}" if micro else "")
            )


def _check_rope_against_base(recipe: Recipe, tokenizer) -> list[str]:
    """The recipe's RoPE settings against the base's rotary spec (head_dim, base, L0), before any stage trains.

    Raises on errors; returns the warnings.
    """
    if not any(stage.rope for stage in recipe.stages):
        return []
    errors, warnings = stage_rope_issues(recipe.stages, _base_config(recipe, tokenizer))
    if errors:
        lines = [f"{'.'.join(str(p) for p in path)}: {msg}" for path, msg in errors]
        names = {i: st.name for i, st in enumerate(recipe.stages)}
        lines = [line.replace(f"stages.{i}.", f"stages.{name}.", 1) for line in lines for i, name in names.items()
                 if line.startswith(f"stages.{i}.")]
        raise RunError(f"RoPE settings do not fit the base model {recipe.base}:\n" + "\n".join(lines))
    return warnings


def _base_config(recipe: Recipe, tokenizer):
    if recipe.base.startswith("preset:"):
        return preset_config(recipe.base.removeprefix("preset:"), vocab_size=len(tokenizer))
    local_only = not recipe.base.startswith("hub:")
    return transformers.AutoConfig.from_pretrained(_base_path(recipe), local_files_only=local_only)


def _check_convert_against_base(recipe: Recipe, tokenizer) -> None:
    """Each stage's `convert` against the config its start model will have (heads divisible, family supported)."""
    if not any(stage.convert for stage in recipe.stages):
        return
    from midtrain.model.convert import recipe_conversion_problems

    problems = recipe_conversion_problems(recipe, _base_config(recipe, tokenizer))
    if problems:
        raise RunError(f"architecture conversion does not fit the base model {recipe.base}:\n" + "\n".join(problems))


def _log_conversion(ctx: RunContext, stage: StagePlan, state: TrainerState, report) -> None:
    from midtrain.model.convert import describe

    print_main(ctx, f"stage {stage.name!r}: {describe(report)}")
    drift = {k: report.drift[k] for k in ("rel_logits_error", "loss_before", "loss_after") if k in report.drift}
    ctx.metrics.write({"event": "convert", "step": state.global_step, "tokens": state.global_tokens,
                       "stage": stage.name, "kind": report.kind, "changed_params": len(report.changed), **drift})


def _check_attention(recipe: Recipe, device: torch.device) -> None:
    if recipe.attention == "flex_attention" and device.type != "cuda":
        raise RunError(f"attention: flex_attention needs a CUDA device (this run uses {device}); use sdpa")


def _check_optional_loggers(options: RunOptions) -> None:
    import importlib.util

    for wanted, module in ((options.tensorboard, "tensorboard"), (options.wandb, "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise RunError(f"--{module} needs the {module} package: pip install {module}")


def run(recipe: Recipe, options: RunOptions | None = None) -> RunContext:
    options = options or RunOptions()
    _check_optional_loggers(options)
    transformers.utils.logging.disable_progress_bar()  # our own progress bars say what happens
    dist = init_distributed(recipe.distributed)
    _check_attention(recipe, dist.device)
    plan = build_plan(recipe)
    run_dir = Path(recipe.run_dir)
    lock = RunLock(run_dir) if dist.is_main else contextlib.nullcontext()
    with lock, PreemptionGuard() as guard:
        if isinstance(lock, RunLock) and lock.took_over is not None:
            print(f"note: took over a stale lock of pid {lock.took_over.get('pid')} (no such process)", flush=True)
        _prepare_run_dir(recipe, plan, run_dir, options, dist.is_main)
        barrier()
        tokenizer = resolve_tokenizer(recipe)
        rope_warnings = _check_rope_against_base(recipe, tokenizer)  # before tokenizing: fail in seconds
        _check_convert_against_base(recipe, tokenizer)
        sources = _tokenize_all(recipe, tokenizer, dist)
        precision = resolve_precision(recipe.precision, dist.device)
        ctx = RunContext(recipe, plan, dist, run_dir, tokenizer, sources,
                         [s.domain_name for s in recipe.sources], options, precision)
        print_main(ctx, f"precision: {precision} (recipe: {recipe.precision}; device: {dist.device})")
        for warning in plan.warnings + [w for w in rope_warnings if w not in plan.warnings]:
            print_main(ctx, f"warning: {warning}")
        _check_batch_splits(recipe, plan, dist.world_size)  # at launch: not after hours of an earlier stage
        unknown = [name for name in options.override_gates if name not in {s.name for s in plan.stages}]
        if unknown:
            raise RunError(f"--override-gate {', '.join(unknown)}: no such stage "
                           f"(stages: {[s.name for s in plan.stages]})")
        try:
            for stage in plan.stages:
                if stage_finished(ctx, stage):
                    print_main(ctx, f"stage {stage.name!r} already finished; skipping")
                    if stage_eval.eval_outdated(ctx, stage):
                        _reevaluate(ctx, stage)
                else:
                    if guard.agreed(dist.device):  # a signal between stages: nothing to save, the last stage finished
                        raise Preempted(guard.signal_name, stage.first_step)
                    if recipe.stages[stage.index].seeds:  # K branches souped into the stage's export
                        from midtrain.train.branches import run_branches

                        run_branches(ctx, stage, guard)
                    else:
                        run_stage(ctx, stage, guard)
                    barrier()
                stage_eval.check_gate(ctx, stage)  # raises GateFailed: the run stops here, resumable
        except stage_eval.GateFailed:
            _write_report(ctx)
            raise
        _write_report(ctx)
    return ctx
