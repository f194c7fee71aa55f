"""`midtrain rope ...`: inspect RoPE remappings (and, with the search, find LongRoPE factors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

rope_app = typer.Typer(no_args_is_help=True, help="Inspect and search RoPE frequency remappings.")


@rope_app.command("show")
def show(
    method: Annotated[str, typer.Option(help="Method(s), comma-separated: default, linear, ntk, dynamic, abf, yarn, "
                                              "llama3, longrope.")] = "yarn",
    factor: Annotated[Optional[float], typer.Option(help="Scale factor s = L / L0.")] = None,
    base: Annotated[float, typer.Option(help="The model's rope_theta.")] = 10000.0,
    head_dim: Annotated[int, typer.Option(help="Attention head dimension.")] = 64,
    original: Annotated[int, typer.Option(help="L0: the context the model was trained at.")] = 256,
    target: Annotated[Optional[int], typer.Option(help="Sequence length to show (default s * L0).")] = None,
    partial_rotary_factor: Annotated[float, typer.Option(help="Fraction of head_dim that rotates.")] = 1.0,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", help="Method parameter KEY=VALUE, e.g. beta_fast=4 or rope_theta=5e5 (repeatable).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write wavelength vs scale factor to this PNG.")] = None,
) -> None:
    """Print per-dimension wavelengths, scale factors and the attention factor of one or more methods."""
    from midtrain.cli import EXIT_RECIPE, _fail, console, escape
    from midtrain.context.rope import coerce_param, rope_show

    params = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--param {item!r}: expected KEY=VALUE, e.g. beta_fast=4", EXIT_RECIPE)
        try:
            params[key.strip()] = coerce_param(key.strip(), _number(value.strip()))
        except ValueError as exc:
            _fail(escape(f"--param {key}: {exc}"), EXIT_RECIPE)
    try:
        out = rope_show(method, factor, base, head_dim, original, target, plot,
                        partial_rotary_factor=partial_rotary_factor, **params)
    except ValueError as exc:
        _fail(escape(str(exc)), EXIT_RECIPE)
    console.print(out, highlight=False, markup=False)


def _number(text: str):
    """CLI values arrive as text: numbers and booleans become themselves, lists stay comma-separated floats."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if "," in text:
        return [float(v) for v in text.split(",") if v.strip()]
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
