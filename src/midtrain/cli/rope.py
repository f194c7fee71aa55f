"""`midtrain rope ...`: inspect RoPE remappings (and, with the search, find LongRoPE factors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import typer

from midtrain.cli.common import EXIT_RECIPE, EXIT_RUN, console, escape, fail

rope_app = typer.Typer(no_args_is_help=True, help="Inspect and search RoPE frequency remappings.")


@rope_app.command("show")
def show(
    method: Annotated[str, typer.Option(help="Method(s), comma-separated: default, linear, ntk, dynamic, abf, yarn, "
                                              "llama3, longrope.")] = "yarn",
    factor: Annotated[Optional[float], typer.Option(help="Scale factor s = L / L0.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="Read head_dim, rope_theta, partial rotary and L0 from this HF checkpoint's config.json.",
        show_default=False)] = None,
    base: Annotated[Optional[float], typer.Option(help="The model's rope_theta [default: 10000].",
                                                  show_default=False)] = None,
    head_dim: Annotated[Optional[int], typer.Option(help="Attention head dimension [default: 64].",
                                                    show_default=False)] = None,
    original: Annotated[Optional[int], typer.Option(help="L0: the context the model was trained at [default: 256].",
                                                    show_default=False)] = None,
    target: Annotated[Optional[int], typer.Option(help="Sequence length to show (default s * L0).")] = None,
    partial_rotary_factor: Annotated[Optional[float], typer.Option(
        help="Fraction of head_dim that rotates [default: 1.0].", show_default=False)] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", help="Method parameter KEY=VALUE, e.g. beta_fast=4 or rope_theta=5e5 (repeatable).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write wavelength vs scale factor to this PNG.")] = None,
    layer_type: Annotated[Optional[str], typer.Option(
        help="With --checkpoint of a per-layer-type RoPE model (Gemma 3/4, OLMo 3): show the method on this layer "
             "type only [default: every layer type, the method on those an extension touches by default (the "
             "global ones), the others as they stay].", show_default=False)] = None,
) -> None:
    """Print per-dimension wavelengths, scale factors and the attention factor of one or more methods. With a
    --checkpoint whose RoPE is set per layer type, one section per layer type."""
    from midtrain.context.rope import coerce_param, rope_show

    given = {"base": base, "head_dim": head_dim, "original": original, "partial_rotary_factor": partial_rotary_factor}
    defaults = {"base": 10000.0, "head_dim": 64, "original": 256, "partial_rotary_factor": 1.0}
    sections = [_Section(None, "", {}, True)]
    if checkpoint is not None:
        sections = _checkpoint_rotary(checkpoint, layer_type)
        defaults.pop("original")  # L0 is never guessed for a checkpoint

    params = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param {item!r}: expected KEY=VALUE, e.g. beta_fast=4", EXIT_RECIPE)
        try:
            params[key.strip()] = coerce_param(key.strip(), _number(value.strip()))
        except ValueError as exc:
            fail(escape(f"--param {key}: {exc}"), EXIT_RECIPE)
    outputs = []
    plotted = False
    for section in sections:
        fallback = {**defaults, **section.values}
        if original is None and "original" not in fallback:
            fail(escape(f"--checkpoint {checkpoint}: its config does not record L0 (original_max_position_embeddings)"
                        + (f" for layer type {section.layer_type}" if section.layer_type else "")
                        + "; pass --original, the length it was trained at"), EXIT_RECIPE)
        values = {k: v if v is not None else fallback[k] for k, v in given.items()}
        for problem in show_argument_problems(factor, values["base"], values["head_dim"], values["original"], target,
                                              values["partial_rotary_factor"], plot):
            fail(escape(problem), EXIT_RECIPE)
        shown_target = target or int(round((factor or 1) * values["original"]))
        try:
            if section.touched:  # the method, as an extension would remap this layer type
                out = rope_show(method, factor, values["base"], values["head_dim"], values["original"], shown_target,
                                None if plotted else plot, partial_rotary_factor=values["partial_rotary_factor"],
                                **params)
                plotted = plotted or plot is not None
            else:  # left as it is: its own wavelengths, for comparison
                out = rope_show("default", None, values["base"], values["head_dim"], values["original"],
                                shown_target, partial_rotary_factor=values["partial_rotary_factor"])
        except ValueError as exc:
            fail(escape(str(exc)), EXIT_RECIPE)
        outputs.append(f"{section.heading}\n{out}" if section.heading else out)
    console.print("\n\n".join(outputs), highlight=False, markup=False)


def show_argument_problems(factor: float | None, base: float, head_dim: int, original: int, target: int | None,
                           partial_rotary_factor: float, plot: Path | None) -> list[str]:
    """Every `rope show` number checked at the edge: finite and in range (one line each, naming the option)."""
    import math

    problems = []
    if factor is not None and not (math.isfinite(factor) and factor >= 1):
        problems.append(f"--factor {factor}: must be a finite number >= 1 (the context extension s = L / L0)")
    if not (math.isfinite(base) and base > 1):
        problems.append(f"--base {base}: must be a finite rope_theta > 1 (e.g. 10000)")
    if not (0 < partial_rotary_factor <= 1):
        problems.append(f"--partial-rotary-factor {partial_rotary_factor}: must lie in (0, 1]")
    elif head_dim <= 0 or int(head_dim * partial_rotary_factor) < 2 or int(head_dim * partial_rotary_factor) % 2:
        problems.append(f"--head-dim {head_dim}: the rotated part (head_dim x partial_rotary_factor = "
                        f"{head_dim * partial_rotary_factor:g}) must be a positive even number of dimensions")
    for option, value in (("--original", original), ("--target", target)):
        if value is not None and value < 1:
            problems.append(f"{option} {value}: must be a positive number of tokens")
    if plot is not None and not plot.parent.is_dir():
        problems.append(f"--plot {plot}: directory {plot.parent} does not exist")
    return problems


@rope_app.command("search")
def search(
    checkpoint: Annotated[Path, typer.Argument(help="Local HF checkpoint directory (config, weights, tokenizer).")],
    target_length: Annotated[int, typer.Option(help="Length L to extend to; fitness is the loss at L tokens.")],
    data: Annotated[Path, typer.Option(help="Held-out long documents: a .jsonl / .txt file or a directory.")],
    original: Annotated[Optional[int], typer.Option(
        help="L0, the length the checkpoint was trained at (default: its config's original_max_position_embeddings)."
    )] = None,
    population: Annotated[int, typer.Option(help="Candidates per generation (half are kept as parents).")] = 16,
    generations: Annotated[int, typer.Option(help="Generations after the initial one (raise it to extend).")] = 8,
    seed: Annotated[int, typer.Option(help="Search seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Output dir: rope.yaml, history.json, state.json (resumed).")] = Path(
        "longrope-search"),
    text_field: Annotated[str, typer.Option(help="jsonl field holding the text.")] = "text",
    windows: Annotated[int, typer.Option(help="Windows of L tokens scored per candidate.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    beta_fast: Annotated[Optional[float], typer.Option(
        help="beta_fast of the YaRN ramp the search starts from (default min(32, max(2, L0/32))).")] = None,
) -> None:
    """Evolutionary search of LongRoPE long factors for CHECKPOINT at --target-length (resumable)."""

    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        fail(escape(f"CHECKPOINT {checkpoint}: not a checkpoint directory with a config.json"), EXIT_RECIPE)
    if not data.exists():
        fail(escape(f"--data {data}: does not exist"), EXIT_RECIPE)
    if original is None:
        original = _config_original(checkpoint)
        if original is None:
            fail(escape(f"--original is required: {checkpoint / 'config.json'} does not say the length the "
                        "model was trained at (rope_parameters.original_max_position_embeddings)"), EXIT_RECIPE)
    from midtrain.context.search import SearchConfig

    try:
        cfg = SearchConfig(target_length=target_length, original=original, population=population,
                           generations=generations, seed=seed, beta_fast=beta_fast, max_windows=windows,
                           batch_size=batch_size)
    except ValueError as exc:
        fail(escape(f"--{_option_of(str(exc))}: {exc}"), EXIT_RECIPE)
    expected = _expected_errors()
    try:
        result = _run_search(checkpoint, data, text_field, cfg, out, console)
    except expected as exc:  # bad data, a foreign state file, an unloadable checkpoint: one line, exit 1
        fail(escape(str(exc)), EXIT_RUN)
    console.print(
        f"best loss at {target_length}: {result.best_loss:.4f} (ppl {result.best_ppl:.3f}); YaRN-ramp start "
        f"{result.init_loss:.4f} (ppl {result.init_ppl:.3f}); {result.evaluations} candidates evaluated\n"
        f"recipe snippet: {out / 'rope.yaml'}  history: {out / 'history.json'}", highlight=False)


class _Section(NamedTuple):
    """One table of `rope show`: a layer type of a per-layer-type RoPE model (None: the whole model)."""

    layer_type: str | None
    heading: str  # "layer type full_attention: rope_type default, rope_theta 1e+06 ..." ("" for the whole model)
    values: dict  # base, head_dim, partial_rotary_factor and, where recorded, original
    touched: bool  # shown with the method (else as it stays)


def _describe(params: dict) -> str:
    """rope_type, theta and the remap's own numbers of one rope_parameters dict, as one line."""
    keys = ("rope_theta", "factor", "original_max_position_embeddings", "partial_rotary_factor")
    parts = [f"rope_type {params.get('rope_type', params.get('type', 'default'))}"]
    for key in keys:
        value = params.get(key)
        if value is not None:
            parts.append(f"{key} {value:g}" if isinstance(value, (int, float)) else f"{key} {value}")
    return ", ".join(parts)


def _checkpoint_rotary(checkpoint: Path, layer_type: str | None = None) -> list[_Section]:
    """head_dim, rope_theta, partial rotary factor and, where its config records it, L0 (a config's
    max_position_embeddings is not always the length it was trained at, so L0 is never guessed from it). A model
    with RoPE per layer type gives one section per type, the method shown on those an extension touches by
    default (or on `layer_type` only)."""
    import transformers

    from midtrain.context.methods import RotarySpec, rope_layer_parameters
    from midtrain.context.remap import default_layer_types

    if not (checkpoint / "config.json").is_file():
        fail(escape(f"--checkpoint {checkpoint}: no config.json there"), EXIT_RECIPE)
    try:
        config = transformers.AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
        per_type = rope_layer_parameters(config)
        if per_type is None and layer_type is not None:
            fail(escape(f"--layer-type {layer_type}: {checkpoint} sets one RoPE for all layers"), EXIT_RECIPE)
        if per_type is not None and layer_type is not None and layer_type not in per_type:
            fail(escape(f"--layer-type {layer_type}: no such layer type with RoPE in {checkpoint} (it has: "
                        f"{', '.join(per_type)})"), EXIT_RECIPE)
        specs = {None: RotarySpec.from_config(config)} if per_type is None else {
            name: RotarySpec.from_config(config, name) for name in per_type}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        fail(escape(f"--checkpoint {checkpoint}: cannot read its rotary settings ({exc})"), EXIT_RECIPE)
    recorded = None
    info = checkpoint / "midtrain.json"  # a midtrain export records the length its stage trained at
    if info.is_file():
        import json

        try:
            recorded = json.loads(info.read_text()).get("seq_len")
        except ValueError:
            recorded = None
    default = default_layer_types(list(per_type or ()))
    sections = []
    for name, spec in specs.items():
        original = spec.original_max_position_embeddings or recorded
        values = {"base": spec.base, "head_dim": spec.head_dim, "partial_rotary_factor": spec.partial_rotary_factor,
                  **({"original": int(original)} if original else {})}
        if name is None:
            sections.append(_Section(None, "", values, True))
            continue
        if layer_type is not None:
            touched = name == layer_type
            note = "shown with the method (--layer-type)" if touched else "not shown"
        else:
            touched = name in default
            note = "an extension remaps it by default" if touched else \
                "an extension leaves it as it is unless rope.layer_types names it; shown as it stays"
        heading = f"layer type {name}: {_describe(per_type[name])} ({note})"
        if layer_type is not None and not touched:
            console.print(heading, highlight=False, markup=False)  # listed, no table
            continue
        sections.append(_Section(name, heading, values, touched))
    return sections


def _config_original(checkpoint: Path) -> int | None:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    value = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    return int(value) if value else None


def _option_of(message: str) -> str:
    for key, option in (("target_length", "target-length"), ("original", "original"), ("population", "population"),
                        ("generations", "generations"), ("max_windows", "windows"), ("beta_fast", "beta-fast")):
        if message.startswith(key):
            return option
    return "options"


def _expected_errors() -> tuple[type[Exception], ...]:
    from midtrain.context.search import SearchError
    from midtrain.data import DataError

    return (SearchError, DataError, FileNotFoundError, RuntimeError, ValueError, OSError)


def _run_search(checkpoint: Path, data: Path, text_field: str, cfg, out: Path, console):
    """Load once, search with a progress bar (plain lines when not a terminal), return the SearchResult."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from midtrain.context.search import longrope_search
    from midtrain.data.sources import long_documents
    from midtrain.model import load_model, load_tokenizer

    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    docs = long_documents(data, tokenizer, cfg.target_length, text_field=text_field,
                               max_documents=cfg.max_windows)
    meta = {"checkpoint": str(checkpoint.resolve()), "data": str(data.resolve()), "text_field": text_field}
    budget = cfg.population + cfg.generations * (cfg.population - cfg.parents)  # at most this many evaluations
    console.print(f"LongRoPE search: L0 {cfg.original} -> {cfg.target_length} (s = {cfg.factor:g}), "
                  f"{len(docs)} documents, <= {budget} evaluations; state in {out / 'state.json'}", highlight=False)
    if not console.is_terminal:
        def plain(kind: str, info: dict) -> None:
            if kind == "generation":
                console.print(f"generation {info['generation']}/{cfg.generations}: best loss "
                              f"{info['best_loss']:.4f} (ppl {info['best_ppl']:.3f}), mean {info['mean_loss']:.4f}, "
                              f"{info['evaluations']} evaluated, {info['seconds']:.1f}s", highlight=False)

        return longrope_search(model, docs, cfg, out, reporter=plain, meta=meta)
    columns = (TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(),
               TextColumn("gen {task.fields[gen]}  best loss {task.fields[best]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("search", total=budget, gen="-", best="-")

        def live(kind: str, info: dict) -> None:
            progress.update(task, completed=min(info["evaluations"], budget), gen=str(info["generation"]),
                            best=f"{info['best_loss']:.4f}")

        return longrope_search(model, docs, cfg, out, reporter=live, meta=meta)


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
