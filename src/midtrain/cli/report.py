"""`midtrain report RUN_DIR`: (re)write a run's report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from midtrain.cli.common import EXIT_RUN, console, escape, fail


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (plan.json, metrics.jsonl, eval/).")],
) -> None:
    """Write RUN_DIR/report.md, report.html and plots/*.png (loss, LR and mixture, evals, gates)."""
    from midtrain.layout import RunLayout
    from midtrain.report import write_report

    layout = RunLayout(run_dir)
    if not layout.plan.is_file():
        fail(escape(f"{run_dir}: not a run directory (no plan.json)"), EXIT_RUN)
    if not os.access(run_dir, os.W_OK | os.X_OK):
        fail(escape(f"{run_dir}: not writable, so its report cannot be written there (copy the run dir elsewhere "
                    "and run `midtrain report` on the copy)"), EXIT_RUN)
    try:
        out = write_report(run_dir)
    except OSError as exc:  # e.g. a read-only file system or a full disk while drawing a plot
        fail(escape(f"{exc.filename or run_dir}: cannot write the report ({exc.strerror or exc})"), EXIT_RUN)
    console.print(f"report: {out} and {layout.report_md}")
