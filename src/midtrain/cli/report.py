"""`midtrain report RUN_DIR`: (re)write a run's report."""

from __future__ import annotations

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
    out = write_report(run_dir)
    console.print(f"report: {out} and {layout.report_md}")
