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
from midtrain.model import forward_packed, load_model
from midtrain.model.head import resolve_loss_chunk_tokens
from midtrain.train.distributed import barrier

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


def eval_spec(ctx, stage) -> EvalSpec:
    return EvalSpec.from_config(ctx.recipe.stages[stage.index].eval, seed=ctx.recipe.seed)


def heldout_documents(ctx, stage) -> list:
    max_docs = ctx.recipe.stages[stage.index].eval.max_docs
    return [d for s in ctx.sources for d in s.holdout_docs()[:max_docs]]


def evaluate_stage(ctx, stage, model, batches, when: str, step: int, tokens: int, source: str,
                   export_dir: Path | None = None) -> None:
    """Writes eval/<stage>[-before].json. Collective (held-out loss); `export_dir` is evaluated instead of `model`
    for the generated tasks when given (rank 0 loads it)."""
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
        plain = load_model(export_dir).to(ctx.dist.device) if export_dir is not None else model
        log = (lambda msg: print_line(ctx, msg)) if ctx.options.progress else None
        more, details = evaluate(plain, ctx.tokenizer, spec, documents=heldout_documents(ctx, stage),
                                 checkpoint_dir=export_dir or (Path(source) if Path(source).is_dir() else None),
                                 precision=ctx.precision, log=log)
        metrics.update(more)
    out = {"stage": stage.name, "when": when, "step": step, "tokens": tokens, "checkpoint": source,
           "metrics": dict(sorted(metrics.items())), "details": details}
    path = ctx.eval_path(stage, when)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, out)
    barrier()


def eval_outdated(ctx, stage) -> bool:
    """True when a finished stage's evals were made with other tasks/lengths than the recipe now asks for."""
    want = eval_spec(ctx, stage).to_json()
    for when in ("before", "after"):
        path = ctx.eval_path(stage, when)
        if not path.is_file() or json.loads(path.read_text()).get("details", {}).get("spec") != want:
            return True
    return False


def check_gate(ctx, stage) -> None:
    """Evaluates the stage's gate on its recorded evals, records the outcome, raises GateFailed unless it passes or
    is overridden (`--override-gate`, now or in an earlier run)."""
    gate = ctx.recipe.stages[stage.index].gate
    after_path, before_path = ctx.eval_path(stage, "after"), ctx.eval_path(stage, "before")
    if not gate or not after_path.is_file():
        return
    record = json.loads(after_path.read_text())
    before = json.loads(before_path.read_text())["metrics"] if before_path.is_file() else {}
    results = evaluate_gate(gate, record["metrics"], before)
    passed = all(r.passed for r in results)
    previous = record.get("gate") or {}
    overridden = not passed and (stage.name in ctx.options.override_gates or bool(previous.get("overridden")))
    outcome = {"passed": passed, "overridden": overridden, "spec": dict(gate),
               "conditions": [r.to_json() for r in results]}
    if ctx.dist.is_main and outcome != previous:
        record["gate"] = outcome
        write_json_atomic(after_path, record)
    if passed:
        print_line(ctx, f"stage {stage.name!r} passed its gate: " + "; ".join(r.reason for r in results))
    elif overridden:
        print_line(ctx, f"warning: stage {stage.name!r} failed its gate, overridden (--override-gate): "
                   + "; ".join(r.reason for r in results if not r.passed))
    else:
        raise GateFailed(stage.name, results, after_path)


def gate_failed_on_record(run_dir: Path, stage_name: str) -> bool:
    path = run_dir / "eval" / f"{stage_name}.json"
    if not path.is_file():
        return False
    gate = json.loads(path.read_text()).get("gate") or {}
    return gate.get("passed") is False and not gate.get("overridden")


def set_aside_failed_attempt(run_dir: Path, stage_name: str) -> int:
    """Moves a gate-failed stage's export, checkpoints and evals to `*.gate-failed-<k>`; returns k."""
    k = 1
    while (run_dir / "eval" / f"{stage_name}.gate-failed-{k}.json").exists():
        k += 1
    moves = [(run_dir / "stages" / stage_name, run_dir / "stages" / f"{stage_name}.gate-failed-{k}"),
             (run_dir / "checkpoints" / stage_name, run_dir / "checkpoints" / f"{stage_name}.gate-failed-{k}"),
             (run_dir / "eval" / f"{stage_name}-before.json", run_dir / "eval" / f"{stage_name}-before.gate-failed-{k}.json"),  # noqa: E501
             (run_dir / "eval" / f"{stage_name}.json", run_dir / "eval" / f"{stage_name}.gate-failed-{k}.json")]
    for src, dst in moves:
        if src.exists():
            shutil.move(str(src), str(dst))
    return k


def print_line(ctx, message: str) -> None:
    if not ctx.dist.is_main:
        return
    if ctx.options.console is not None:
        ctx.options.console.print(message, markup=False, highlight=False)
    else:
        print(message, flush=True)
