"""A stage's before/after evaluation, its gate, and setting a gate-failed attempt aside (for `midtrain run`).

The held-out loss is collective (every rank, the training model, possibly FSDP-sharded); generated tasks and
perplexity vs length run on rank 0 on a plain model: the start model before, the HF export after (what users get).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from midtrain.eval.gates import ConditionResult, evaluate_gate
from midtrain.eval.heldout import heldout_metrics
from midtrain.eval.suite import EvalSpec, evaluate
from midtrain.io import write_json_atomic
from midtrain.layout import RunLayout
from midtrain.model import forward_packed, load_model
from midtrain.model.head import resolve_loss_chunk_tokens
from midtrain.plan import StagePlan
from midtrain.run.context import RunContext
from midtrain.run.setup import heldout_batches, initial_model
from midtrain.train.distributed import barrier
from midtrain.train.trainer import TrainerState

EXIT_GATE = 3  # `midtrain run` exit code when a stage fails its gate (docs/CONTRACTS.md §4.1)


class GateFailed(Exception):
    """A stage's after-eval misses its gate; the run stops, resumable."""

    def __init__(self, stage: str, results: Sequence[ConditionResult], eval_file: Path):
        self.stage, self.results = stage, list(results)
        failed = [r.reason for r in results if not r.passed]
        super().__init__(
            f"stage {stage!r} failed its gate ({eval_file}):\n"
            + "\n".join(f"  {line}" for line in failed)
            + f"\nthe run stopped after {stage!r}; its checkpoints, export and evals are kept. To go on: change the "
            f"stage (e.g. more tokens) or its gate in the recipe and re-run, or re-run with --override-gate {stage}"
        )


def eval_spec(ctx: RunContext, stage: StagePlan) -> EvalSpec:
    return EvalSpec.from_config(ctx.recipe.stages[stage.index].eval, seed=ctx.recipe.seed)


def heldout_documents(ctx: RunContext, stage: StagePlan) -> list:
    max_docs = ctx.recipe.stages[stage.index].eval.max_docs
    return [d for s in ctx.sources for d in s.holdout_docs()[:max_docs]]


def evaluate_stage(ctx: RunContext, stage: StagePlan, model, batches, when: str, state: TrainerState, source: str,
                   out: Path, export_dir: Path | None = None) -> None:
    """Writes `out` (eval/<stage>[-before].json, or a branch's eval.json). Collective (held-out loss); `export_dir`
    is evaluated instead of `model` for the generated tasks when given (rank 0 loads it)."""
    spec = eval_spec(ctx, stage)
    metrics: dict[str, float] = {}
    if "loss" in spec.tasks and batches:
        forward = forward_packed
        batch_tokens = max(b["input_ids"].numel() for b in batches)
        chunk = resolve_loss_chunk_tokens(ctx.recipe.loss_chunk_tokens, model, batch_tokens)
        if chunk is not None:  # the head a chunk of rows at a time, as in training
            forward = functools.partial(forward_packed, loss_chunk_tokens=chunk)
        metrics = heldout_metrics(model, forward, batches, ctx.domains, device=ctx.dist.device,
                                  precision=ctx.precision)
    if not ctx.dist.is_main:
        barrier()
        return
    details: dict = {"spec": spec.to_json()}
    if set(spec.tasks) - {"loss"}:
        trust = ctx.recipe.trust_remote_code
        plain = load_model(export_dir, trust_remote_code=trust).to(ctx.dist.device) if export_dir is not None else model
        log = ctx.print if ctx.options.progress else None
        more, details = evaluate(plain, ctx.tokenizer, spec, documents=heldout_documents(ctx, stage),
                                 checkpoint_dir=export_dir or (Path(source) if Path(source).is_dir() else None),
                                 precision=ctx.precision, log=log, out_dir=out.with_suffix(""))
        metrics.update(more)
    record = {"stage": stage.name, "when": when, "step": state.global_step, "tokens": state.global_tokens,
              "checkpoint": source, "metrics": dict(sorted(metrics.items())), "details": details}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    barrier()


def eval_outdated(ctx: RunContext, stage: StagePlan) -> bool:
    """True when a finished stage's evals were made with other tasks/lengths than the recipe now asks for."""
    want = eval_spec(ctx, stage).to_json()
    for when in ("before", "after"):
        path = ctx.stage_layout(stage).eval(when)
        if not path.is_file() or json.loads(path.read_text()).get("details", {}).get("spec") != want:
            return True
    return False


def reevaluate(ctx: RunContext, stage: StagePlan) -> None:
    """A finished stage whose recipe now lists other eval tasks/lengths: evaluate its start and end again."""
    ctx.print(f"stage {stage.name!r}: eval tasks changed; evaluating its start and end checkpoints again")
    heldout, layout = heldout_batches(ctx, stage), ctx.stage_layout(stage)
    for when in ("before", "after"):
        old = json.loads(layout.eval(when).read_text()) if layout.eval(when).is_file() else {}
        step = old.get("step", stage.first_step if when == "before" else stage.first_step + stage.steps)
        state = TrainerState(stage_step=0, global_step=step, global_tokens=old.get("tokens", 0))
        trust = ctx.recipe.trust_remote_code
        model = initial_model(ctx, stage) if when == "before" else load_model(layout.export, trust_remote_code=trust)
        source = old.get("checkpoint", str(layout.export))
        evaluate_stage(ctx, stage, model.to(ctx.dist.device), heldout, when, state, source, layout.eval(when),
                       export_dir=layout.export if when == "after" else None)


def check_gate(ctx: RunContext, stage: StagePlan) -> None:
    """Evaluates the stage's gate on its recorded evals, records the outcome, raises GateFailed unless it passes or
    is overridden (`--override-gate`, now or in an earlier run)."""
    gate = ctx.recipe.stages[stage.index].gate
    after_path, before_path = ctx.stage_layout(stage).eval_after, ctx.stage_layout(stage).eval_before
    if not gate or not after_path.is_file():
        return
    record = json.loads(after_path.read_text())
    before = json.loads(before_path.read_text())["metrics"] if before_path.is_file() else {}
    results = evaluate_gate(gate, record["metrics"], before, skipped=record.get("details", {}).get("skipped"))
    passed = all(r.passed for r in results)
    previous = record.get("gate") or {}
    overridden = not passed and (stage.name in ctx.options.override_gates or bool(previous.get("overridden")))
    outcome = {"passed": passed, "overridden": overridden, "spec": dict(gate),
               "conditions": [r.to_json() for r in results]}
    if ctx.dist.is_main and outcome != previous:
        record["gate"] = outcome
        write_json_atomic(after_path, record)
    if passed:
        ctx.print(f"stage {stage.name!r} passed its gate: " + "; ".join(r.reason for r in results))
    elif overridden:
        ctx.print(f"warning: stage {stage.name!r} failed its gate, overridden (--override-gate): "
                   + "; ".join(r.reason for r in results if not r.passed))
    else:
        raise GateFailed(stage.name, results, after_path)


def gate_failed_on_record(layout: RunLayout, stage_name: str) -> bool:
    path = layout.stage(stage_name).eval_after
    if not path.is_file():
        return False
    gate = json.loads(path.read_text()).get("gate") or {}
    return gate.get("passed") is False and not gate.get("overridden")


def set_aside_failed_attempt(layout: RunLayout, stage_name: str) -> int:
    """Moves a gate-failed stage's export, checkpoints and evals to `*.gate-failed-<k>`; returns k."""
    k = 1
    while any(kept.exists() for _, kept in layout.gate_failed_attempt(stage_name, k)):
        k += 1
    for src, dst in layout.gate_failed_attempt(stage_name, k):
        if src.exists():
            shutil.move(str(src), str(dst))
    return k
