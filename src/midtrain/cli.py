"""The `midtrain` command line. Expected failures print one clear message and exit non-zero, never a traceback."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mid-training for large language models.")
recipe_app = typer.Typer(no_args_is_help=True, help="Check and inspect recipes.")
app.add_typer(recipe_app, name="recipe")
# Each capability keeps its commands next to its code; the sub-apps import their heavy modules lazily.
from midtrain.context.cli import rope_app  # noqa: E402

app.add_typer(rope_app, name="rope")
from midtrain.eval.cli import eval_command  # noqa: E402
from midtrain.report.cli import report_command  # noqa: E402

app.command("eval")(eval_command)
app.command("report")(report_command)
from midtrain.data.cli import data_app  # noqa: E402

app.add_typer(data_app, name="data")

# Logs and CI are not terminals: give tables room instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EXIT_RECIPE = 2  # the recipe (or its overrides) is invalid
EXIT_RUN = 1  # the run could not proceed (data, checkpoints, environment)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key: a.b=c (stages by name).", show_default=False),
]


def _fail(message: str, code: int) -> None:
    for line in str(message).splitlines() or [""]:
        err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load(recipe: Path, overrides: list[str] | None):
    from midtrain.config import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _fail(escape(str(exc)), EXIT_RECIPE)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _run(recipe, *, force_recipe_change: bool = False, tensorboard: bool = False, wandb: bool = False,
         override_gates: tuple[str, ...] = ()):
    from midtrain.data import DataError
    from midtrain.train import checkpoint
    from midtrain.train.preemption import EXIT_PREEMPTED, Preempted
    from midtrain.train.run import RunError, RunOptions, run
    from midtrain.train.runlock import RunLockError
    from midtrain.train.stage_eval import EXIT_GATE, GateFailed

    try:
        options = RunOptions(force_recipe_change=force_recipe_change, tensorboard=tensorboard, wandb=wandb,
                             console=console, override_gates=override_gates)
        return run(recipe, options)
    except GateFailed as exc:
        _fail(escape(str(exc)), EXIT_GATE)
    except Preempted as exc:
        err.print(f"[bold yellow]preempted:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except (RunError, RunLockError, DataError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(escape(str(exc)), EXIT_RUN)


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
) -> None:
    """Run a recipe, or resume it from its run directory's newest checkpoint. Exit 3: a stage failed its gate."""
    loaded = _load(recipe, set_)
    ctx = _run(loaded, force_recipe_change=force_recipe_change, tensorboard=tensorboard, wandb=wandb,
               override_gates=tuple(override_gate or ()))
    if ctx.dist.is_main:
        _print_summary(ctx.run_dir, [s.name for s in ctx.plan.stages])


@recipe_app.command("check")
def recipe_check(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write the LR schedule over all stages to this PNG.")] = None,
) -> None:
    """Validate a recipe and print the resolved plan: tokens, steps and LR at stage boundaries."""
    from midtrain.plan import build_plan
    from midtrain.schedule import plot_schedules

    loaded = _load(recipe, set_)
    plan = build_plan(loaded)
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
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if plot is not None:
        offsets = [(st.name, st.schedule, st.first_tokens) for st in plan.stages]
        plot_schedules(offsets, plot)
        console.print(f"LR plot: {plot}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Smaller budgets (<1 min): a smoke test, not held to results.")] = False,
    out: Annotated[Path, typer.Option(help="Directory for the corpus and the run.")] = Path("runs/demo"),
) -> None:
    """Offline two-stage mid-training demo on a tiny model (corpus built from Python's own docs and stdlib)."""
    from midtrain.demo import prepare

    recipe_path, overrides = prepare(out, quick)
    console.print(f"demo recipe: {recipe_path}  (corpus in {out / 'corpus'})")
    loaded = _load(recipe_path, overrides)
    ctx = _run(loaded)
    _print_summary(ctx.run_dir, [s.name for s in ctx.plan.stages])


def _print_summary(run_dir: Path, stages: list[str]) -> None:
    table = Table(title="held-out loss before -> after each stage")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name in stages:
        before_file, after_file = run_dir / "eval" / f"{name}-before.json", run_dir / "eval" / f"{name}.json"
        if not (before_file.is_file() and after_file.is_file()):
            continue
        before = json.loads(before_file.read_text())["metrics"]
        after = json.loads(after_file.read_text())["metrics"]
        for key in sorted(k for k in after if k.startswith("loss")):
            b, a = before.get(key, math.nan), after[key]
            table.add_row(name, key, f"{b:.4f}", f"{a:.4f}", f"{(a - b) / b:+.1%}" if b else "")
    console.print(table)
    console.print(f"run dir: {run_dir}  (metrics.jsonl, eval/, stages/<stage>/hf)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
