"""What every `midtrain` command shares: the consoles, the exit codes, and one-line errors instead of tracebacks.

The command modules of this package import from here; this module imports no other part of `midtrain.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from midtrain.config import Recipe

__all__ = ["EXIT_RECIPE", "EXIT_RUN", "SetOpt", "ThreadsOpt", "console", "err", "escape", "fail", "load_recipe_or_exit",
           "parse_threads"]

# Logs and CI are not terminals: give tables room instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)
"""Standard output of every command: tables, summaries, progress."""
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
"""Standard error: `error:` lines, `preempted:`, `interrupted`."""

EXIT_RECIPE = 2  # the recipe (or its overrides) is invalid
EXIT_RUN = 1  # the run could not proceed (data, checkpoints, environment)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe key: a.b=c (stages by name).", show_default=False),
]
"""The repeatable `--set a.b=c` option of the commands that load a recipe."""


ThreadsOpt = Annotated[Optional[str], typer.Option(
    "--threads", help="torch CPU threads per process: N, or auto (this process's share of the cores the load leaves "
    "idle). Default: the recipe's `threads`, else auto.", show_default=False)]


def parse_threads(text: str | None) -> int | str | None:
    """`--threads`: None, `auto`, or a positive int; anything else exits 2 naming the option."""
    if text is None or text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    fail(f"--threads {text!r}: expected a positive number of threads or auto", EXIT_RECIPE)


def fail(message: str, code: int) -> NoReturn:
    """Print MESSAGE (rich markup, one `error:` line per line) to stderr and exit with CODE."""
    for line in str(message).splitlines() or [""]:
        err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def load_recipe_or_exit(recipe: Path, overrides: list[str] | None) -> Recipe:
    """Load and validate RECIPE with its `--set` OVERRIDES; an invalid recipe fails with exit 2 (EXIT_RECIPE)."""
    from midtrain.config import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        fail(escape(str(exc)), EXIT_RECIPE)


def escape(text: str) -> str:
    """TEXT with rich markup escaped, so paths and messages with [brackets] print as they are."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)
