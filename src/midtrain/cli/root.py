"""The root `midtrain` app: `run`, `demo` and `recipe check`, and the verb groups registered after them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from midtrain.cli.common import (
    EXIT_RECIPE,
    EXIT_RUN,
    SetOpt,
    ThreadsOpt,
    console,
    err,
    escape,
    fail,
    load_recipe_or_exit,
    parse_threads,
)
from midtrain.cli.data import data_app
from midtrain.cli.eval import eval_command
from midtrain.cli.merge import merge_command
from midtrain.cli.mix import mix_app
from midtrain.cli.report import report_command
from midtrain.cli.rope import rope_app
from midtrain.eval.keys import MetricKey

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mid-training for large language models.")
recipe_app = typer.Typer(no_args_is_help=True, help="Check and inspect recipes.")
app.add_typer(recipe_app, name="recipe")


def _run(recipe, *, force_recipe_change: bool = False, tensorboard: bool = False, wandb: bool = False,
         override_gates: tuple[str, ...] = (), fallback_checkpoint: bool = False,
         profile_steps: tuple[int, int] | None = None, threads: int | str | None = None):
    from midtrain.data import DataError
    from midtrain.run import EXIT_GATE, GateFailed, RunError, RunOptions, run
    from midtrain.train import checkpoint
    from midtrain.train.preemption import EXIT_PREEMPTED, Preempted
    from midtrain.train.rollback import RollbackError
    from midtrain.train.runlock import RunLockError

    try:
        options = RunOptions(force_recipe_change=force_recipe_change, tensorboard=tensorboard, wandb=wandb,
                             console=console, override_gates=override_gates,
                             fallback_checkpoint=fallback_checkpoint, profile_steps=profile_steps, threads=threads)
        return run(recipe, options)
    except GateFailed as exc:
        fail(escape(str(exc)), EXIT_GATE)
    except Preempted as exc:
        err.print(f"[bold yellow]preempted:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except (RunError, RunLockError, DataError, checkpoint.CheckpointError, FileNotFoundError, ValueError,
            RollbackError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    except OSError as exc:
        if exc.errno not in checkpoint.DISK_FULL:
            raise
        fail(escape(checkpoint.write_error(exc, Path(recipe.run_dir)) + "; free space and run the same command "
                    "to resume"), EXIT_RUN)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOpt = None,
    force_recipe_change: Annotated[
        bool, typer.Option(help="Continue trained stages although the recipe changed.")
    ] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also log to TensorBoard (needs the tensorboard extra).")] = False,
    wandb: Annotated[bool, typer.Option(help="Also log to Weights & Biases, offline (needs wandb).")] = False,
    override_gate: Annotated[Optional[list[str]], typer.Option(
        "--override-gate", help="Accept STAGE's failed gate and go on (repeatable; recorded in its eval).",
        show_default=False)] = None,
    fallback_checkpoint: Annotated[bool, typer.Option(
        help="If the newest checkpoint fails its checksum, resume from the previous good one.")] = False,
    profile_steps: Annotated[Optional[str], typer.Option(
        help="Trace global steps A:B (or one step A) with torch.profiler into RUN/profile/ (Chrome trace + top ops).",
        show_default=False)] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run a recipe, or resume it from its run directory's newest checkpoint. Exit 3: a stage failed its gate."""
    from midtrain.train.profiling import parse_step_range

    try:
        steps = None if profile_steps is None else parse_step_range(profile_steps)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile-steps") from None
    loaded = load_recipe_or_exit(recipe, set_)
    ctx = _run(loaded, force_recipe_change=force_recipe_change, tensorboard=tensorboard, wandb=wandb,
               override_gates=tuple(override_gate or ()), fallback_checkpoint=fallback_checkpoint,
               profile_steps=steps, threads=parse_threads(threads) or (None if loaded.threads else "auto"))
    if ctx.dist.is_main:
        _print_summary(ctx.run_dir, [s.name for s in ctx.plan.stages])


@recipe_app.command("check")
def recipe_check(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write the LR schedule over all stages to this PNG.")] = None,
) -> None:
    """Validate a recipe against its base, tokenizer and data, and print the resolved plan: tokens, steps and LR at
    stage boundaries. Runs every check `midtrain run` makes before training; exit 2 lists all problems."""
    from midtrain.plan import build_plan
    from midtrain.run import preflight
    from midtrain.schedule import plot_schedules

    loaded = load_recipe_or_exit(recipe, set_)
    plan = build_plan(loaded)
    checks = preflight(loaded, plan)
    if len(checks.problems) == 1:  # one line, as `run` prints it
        fail(escape(f"{recipe}: {checks.problems[0]}"), EXIT_RECIPE)
    if checks.problems:
        fail(escape(f"{recipe}: {len(checks.problems)} problem(s) `midtrain run` would refuse before training:\n"
                    + "\n".join(f"  {p}" for p in checks.problems)), EXIT_RECIPE)
    table = Table(title=f"{recipe} -> {loaded.run_dir}")
    for col in ("stage", "init", "tokens", "steps", "seq_len", "batch", "mixture", "lr start", "lr end", "schedule"):
        table.add_column(col)
    for st in plan.stages:
        s = st.schedule
        table.add_row(
            st.name, st.init, f"{st.tokens:,}", f"{st.steps:,}", str(st.seq_len), f"{st.batch_tokens:,}",
            ", ".join(f"{k} {v:.0%}" for k, v in st.mixture.items()),
            f"{st.lr_at_step(0):.3g}", f"{st.last_lr:.3g}",
            f"{s.kind}" + (f"/{s.decay_shape} {s.decay_fraction:.0%}" if s.kind == "wsd" else ""),
        )
    console.print(table)
    console.print(f"total: {plan.total_tokens:,} tokens, {plan.total_steps:,} steps")
    for warning in checks.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if plot is not None:
        offsets = [(st.name, st.schedule, st.first_tokens) for st in plan.stages]
        plot_schedules(offsets, plot)
        console.print(f"LR plot: {plot}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Smaller budgets (<3 min): a smoke test, not held to results.")] = False,
    out: Annotated[Path, typer.Option(help="Directory for the corpus, tokenizer and run.")] = Path("runs/demo"),
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest for this tiny model on shared "
                                               "cores: 5x over 2 threads under load, docs/DEMO.md).")] = 1,
    build_base: Annotated[bool, typer.Option(help="Rebuild the base checkpoint instead (recipes/demo-base.yaml, "
                                                  "~30 CPU-minutes) and install it in --base-dir.")] = False,
    base_dir: Annotated[Optional[Path], typer.Option(help="The base checkpoint to start from (or, with "
                                                          "--build-base, to write); default: the shipped one.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key of the demo's recipe: a.b=c "
                                                                    "(stages by name).")] = None,
) -> None:
    """Offline mid-training demo on a tiny shipped base: an anneal with replay, then 4x context extension."""
    import torch

    from midtrain.demo import DEMO_BASE, install_base, prepare, prepare_base

    torch.set_num_threads(max(1, threads))
    base = base_dir or DEMO_BASE
    if build_base:
        with console.status("building the demo corpus and training its tokenizer"):
            recipe_path, overrides = prepare_base(out)
        loaded = load_recipe_or_exit(recipe_path, overrides + list(set_ or []))
        ctx = _run(loaded, override_gates=())
        last = ctx.plan.stages[-1]
        metrics = json.loads(ctx.stage_layout(last).eval_after.read_text())["metrics"]
        dest = install_base(ctx.stage_layout(last).export, metrics, base)
        _print_summary(ctx.run_dir, [s.name for s in ctx.plan.stages])
        console.print(f"base installed: {dest}")
        return
    with console.status("building the demo corpus with the base's tokenizer"):
        try:
            recipe_path, overrides = prepare(out, quick, base)
        except FileNotFoundError as exc:
            fail(escape(str(exc)), 2)
    console.print(f"demo recipe: {recipe_path}  (base {base}, corpus in {out / 'corpus'})")
    loaded = load_recipe_or_exit(recipe_path, overrides + list(set_ or []))
    # The demo always reaches its table: a failed gate is recorded (and shown) instead of stopping the run.
    ctx = _run(loaded, override_gates=tuple(s.name for s in loaded.stages))
    _print_summary(ctx.run_dir, [s.name for s in ctx.plan.stages])


def _fmt_metric(key: str, value: float) -> str:
    return f"{value:.2f}" if MetricKey.parse(key).family in ("passkey", "niah", "ruler", "arith") else f"{value:.4f}"


def _print_summary(run_dir: Path, stages: list[str]) -> None:
    from midtrain.layout import RunLayout

    layout = RunLayout(run_dir)
    table = Table(title="before -> after each stage (held-out loss per domain; task accuracy)")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_column("gate")
    shown = ("loss", "passkey", "niah", "ruler", "arith")
    for name in stages:
        before_file, after_file = layout.stage(name).eval_before, layout.stage(name).eval_after
        if not (before_file.is_file() and after_file.is_file()):
            continue
        before = json.loads(before_file.read_text())["metrics"]
        record = json.loads(after_file.read_text())
        after = record["metrics"]
        gates = {c["metric"]: c for c in (record.get("gate") or {}).get("conditions", [])}
        for key in sorted(k for k in after if MetricKey.parse(k).family in shown):
            b, a = before.get(key, math.nan), after[key]
            is_loss = MetricKey.parse(key).task == "loss"
            change = (f"{(a - b) / b:+.1%}" if is_loss and b else f"{a - b:+.2f}") if not math.isnan(b) else ""
            cond = gates.get(key)
            gate = "" if cond is None else f"{cond['condition']} {'ok' if cond['passed'] else 'FAILED'}"
            table.add_row(name, key, _fmt_metric(key, b), _fmt_metric(key, a), change, gate)
    console.print(table)
    console.print(f"run dir: {run_dir}  (metrics.jsonl, eval/, stages/<stage>/hf)")
    for report in (layout.report_html, layout.report_md):
        if report.is_file():
            console.print(f"report: {report}")


# Each capability keeps its commands in its own module of this package (imports of heavy modules stay inside the
# commands); registered after the core verbs so `midtrain --help` lists run, demo and recipe first.
app.command("eval")(eval_command)
app.command("report")(report_command)
app.command("merge")(merge_command)
app.add_typer(data_app, name="data")
app.add_typer(rope_app, name="rope")
app.add_typer(mix_app, name="mix")


def main() -> None:
    """The `midtrain` console script: run the app; Ctrl-C prints `interrupted` and exits 130."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
