"""`midtrain merge CKPT... --out DIR [--weights ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from midtrain.cli.common import EXIT_RUN, console, escape, fail


def merge_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more HF checkpoint dirs of one architecture.")],
    out: Annotated[Path, typer.Option(help="Output checkpoint dir (written atomically).")],
    weights: Annotated[Optional[str], typer.Option(
        help="Comma-separated weights, one per checkpoint (normalised to sum 1); default uniform.")] = None,
) -> None:
    """Average checkpoints tensor by tensor in fp32 ("souping"), one shard at a time."""
    from midtrain.merge.soup import MergeError, merge_checkpoints

    try:
        values = [float(v) for v in weights.split(",")] if weights else None
    except ValueError:
        fail(escape(f"--weights {weights!r}: expected comma-separated numbers"), 2)
    try:
        path = merge_checkpoints(checkpoints, out, values)
    except (MergeError, OSError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    console.print(f"merged {len(checkpoints)} checkpoints -> {path}")
