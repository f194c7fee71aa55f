"""`midtrain mix search|doremi|value`: mixture optimisation (RegMix, DoReMi) and microanneal data valuation for a
recipe's stage.

Heavy modules (torch, transformers) are imported inside the commands so `midtrain --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from midtrain.cli.common import EXIT_RECIPE, EXIT_RUN, SetOpt, console, escape, fail, load_recipe_or_exit

mix_app = typer.Typer(no_args_is_help=True, help="Optimise a stage's data mixture; value candidate data.")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
StageOpt = Annotated[str, typer.Option("--stage", help="The stage whose mixture is searched / valued.")]
TokensOpt = Annotated[Optional[str], typer.Option(help="Training tokens per proxy run, e.g. 200k (default: see "
                                                       "the command).", show_default=False)]
WorkersOpt = Annotated[int, typer.Option(help="Proxy runs trained at a time (processes).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="torch threads per proxy (default: cores / workers).",
                                                   show_default=False)]
StartOpt = Annotated[Optional[str], typer.Option(help="Start proxies from this HF dir or preset:NAME instead of the "
                                                      "stage's start checkpoint.", show_default=False)]
KeepOpt = Annotated[bool, typer.Option(help="Keep each proxy's checkpoints and HF export (default: results only).")]


def _tokens(text: str | None) -> int | None:
    from midtrain.config import parse_tokens

    if text is None:
        return None
    try:
        return parse_tokens(text)
    except ValueError as exc:
        fail(escape(f"--tokens: {exc}"), EXIT_RECIPE)


def _seeds(text: str, option: str) -> tuple[int, ...]:

    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        fail(escape(f"{option} {text!r}: expected comma-separated integers, e.g. 1,2,3"), EXIT_RECIPE)


def _guarded(work, title: str):
    """Runs `work(on_event)` under a progress display; bad input exits 2, a run that cannot proceed exits 1."""
    from midtrain.data import DataError
    from midtrain.mix.proxy import MixError, MixRunError
    from midtrain.run import RunError

    bar, on_event = _progress(console, title)
    try:
        with bar:
            return work(on_event)
    except MixRunError as exc:
        fail(escape(str(exc)), EXIT_RUN)
    except MixError as exc:
        fail(escape(str(exc)), EXIT_RECIPE)
    except (RunError, DataError, ValueError, OSError) as exc:  # ValueError: too few proxies to hold any out
        fail(escape(str(exc)), EXIT_RUN)


def _progress(console, title: str):
    """(context manager, on_event): a rich bar on a terminal, a plain line per finished run otherwise."""
    import contextlib

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    state: dict = {}
    if not console.is_terminal:
        def plain(kind: str, info: dict) -> None:
            if kind == "start":
                state.update(total=info["total"], done=info["done"], phase=info["phase"])
                console.print(f"{title} {info['phase']}: {info['done']}/{info['total']} already done", highlight=False)
            elif kind == "proxy":
                state["done"] += 1
                console.print(f"  {state['done']}/{state['total']} {info['proxy'].dir.name}: "
                              f"{info['result']['seconds']:.0f}s", highlight=False)
        return contextlib.nullcontext(), plain
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)

    def live(kind: str, info: dict) -> None:
        if kind == "start":
            state["task"] = progress.add_task(f"{title} {info['phase']}", total=info["total"],
                                              completed=info["done"])
        elif kind == "proxy":
            progress.advance(state["task"])
    return progress, live


def _default_out(recipe, kind: str, stage: str) -> Path:
    from midtrain.layout import RunLayout

    return RunLayout(recipe.run_dir).mix_work(kind, stage)


def _run_method(recipe_file: Path, set_, kind: str, stage: str, out: Path | None, make_config, run_method):
    """Loads the recipe, builds the method's config (bad options exit 2) and runs it in OUT (default
    RUN/mix/<kind>-<stage>); returns (config, out, summary)."""
    from midtrain.mix.proxy import MixError

    loaded = load_recipe_or_exit(recipe_file, set_)
    try:
        cfg = make_config()
    except MixError as exc:
        fail(escape(str(exc)), EXIT_RECIPE)
    out = out or _default_out(loaded, kind, stage)
    summary = _guarded(lambda on_event: run_method(loaded, recipe_file, cfg, out, on_event), f"mix {kind}")
    return cfg, out, summary


@mix_app.command("search")
def search(
    recipe: RecipeArg,
    stage: StageOpt,
    target: Annotated[str, typer.Option(help="Metric to optimise, as in eval results: loss, loss.<domain>, "
                                             "ppl.<domain>, arith, passkey@L, ... (docs/CONTRACTS.md §4).")],
    proxies: Annotated[int, typer.Option(help="Proxy runs (mixtures sampled); raise it to extend a search.")] = 16,
    tokens: TokensOpt = None,
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Search dir (resumed). Default RUN/mix/search-<stage>.",
                                                show_default=False)] = None,
    concentration: Annotated[float, typer.Option(help="Dirichlet concentration c: mixtures ~ Dir(c * stage "
                                                      "weights); smaller = wider.")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampled mixtures.")] = 0,
    start: StartOpt = None,
    model: Annotated[str, typer.Option(help="Regression: quadratic (ridge on weights + pairwise products), "
                                            "linear, kernel (RBF kernel ridge), auto (quadratic from 2 proxies "
                                            "per coefficient, else linear).")] = "auto",
    folds: Annotated[int, typer.Option(help="k of the k-fold held-out rank correlation.")] = 5,
    fraction_heldout: Annotated[Optional[float], typer.Option(
        "--fraction-heldout", help="Instead of k-fold: hold out this fraction of proxies once.",
        show_default=False)] = None,
    candidates: Annotated[int, typer.Option(help="Candidate mixtures scored to find the best.")] = 100_000,
    top_k: Annotated[int, typer.Option(help="The best mixture is the mean of the top-k candidates.")] = 100,
    verify_seeds: Annotated[str, typer.Option(help="Also train the predicted, recipe and uniform mixtures at these "
                                                   "seeds (e.g. 1,2,3) and measure the target.")] = "",
    keep_models: KeepOpt = False,
    set_: SetOpt = None,
) -> None:
    """RegMix-style search: proxies on Dirichlet mixtures, a regression, the predicted best mixture (a recipe
    snippet). Default --tokens: the stage's own tokens."""
    from midtrain.mix.search import SearchConfig, run_search

    _, out, summary = _run_method(recipe, set_, "search", stage, out, lambda: SearchConfig(
        stage=stage, target=target, proxies=proxies, tokens=_tokens(tokens), concentration=concentration, seed=seed,
        start=start, model=model, folds=folds, heldout=fraction_heldout, candidates=candidates, top_k=top_k,
        verify_seeds=_seeds(verify_seeds, "--verify-seeds"), workers=workers, threads=threads,
        keep_models=keep_models), run_search)
    print_search(summary, console)
    console.print(f"recipe snippet: {out / 'best_mixture.yaml'}  summary: {out / 'summary.json'}", highlight=False)


def print_search(summary: dict, console) -> None:
    from rich.table import Table

    names, target = summary["sources"], summary["target"]
    better = "higher" if summary["higher_is_better"] else "lower"
    cv = summary["cv"]
    console.print(f"{len(summary['proxies'])} proxies; {target} ({better} is better): "
                  f"held-out Spearman {cv['spearman']:.3f} over {cv['n']} predictions ({cv['scheme']}), "
                  f"MAE {cv['mae']:.4f}; model {summary['model']['kind']} (lambda {summary['model']['lambda']:.2g})",
                  highlight=False)
    table = Table(title=f"mixtures for {target}")
    table.add_column("mixture")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("predicted", justify="right")
    verify = summary.get("verify") or {}
    if verify:
        table.add_column("measured (mean ± std over seeds)", justify="right")
    best = summary["best_proxy"]
    rows = [(k, m, f"{summary['predicted_value'][k]:.4f}") for k, m in summary["mixtures"].items()]
    rows.append((f"best proxy (#{best['index']})", best["mixture"], ""))
    for label, mixture, pred in rows:
        cells = [f"{mixture.get(n, 0.0):.3f}" for n in names]
        extra = []
        if verify:
            v = verify.get(label)
            extra = [f"{v['mean']:.4f} ± {v['std']:.4f}" if v else f"{best['value']:.4f} (1 run)"]
        table.add_row(label, *cells, pred, *extra)
    console.print(table)


@mix_app.command("doremi")
def doremi(
    recipe: RecipeArg,
    stage: StageOpt,
    tokens: TokensOpt = None,
    reference: Annotated[str, typer.Option(help="The reference model's mixture, which the proxy's batches are also "
                                                "drawn from: uniform (the paper's) or recipe (the stage's weights).")]
    = "uniform",
    step_size: Annotated[float, typer.Option(help="eta of the domain weights' exponentiated-gradient step.")] = 1.0,
    smoothing: Annotated[float, typer.Option(help="Share of uniform mixed into the weights each step.")] = 1e-3,
    target: Annotated[str, typer.Option(help="Metric --verify-seeds measures (as in eval results).")] = "loss",
    verify_seeds: Annotated[str, typer.Option(help="Also train the stage (its own tokens) on the DoReMi, recipe and "
                                                   "uniform mixtures at these seeds (e.g. 1,2,3); measure --target.")]
    = "",
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    start: StartOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="DoReMi dir (resumed). Default RUN/mix/doremi-<stage>.",
                                                show_default=False)] = None,
    keep_models: KeepOpt = False,
    set_: SetOpt = None,
) -> None:
    """DoReMi (Xie et al. 2023): a reference run on the reference mixture, a proxy trained with Group DRO over the
    stage's sources against it, and the proxy's averaged domain weights (a recipe snippet). Default --tokens: the
    stage's own tokens (for the reference and the proxy each)."""
    from midtrain.mix.doremi import DoremiConfig, run_doremi

    _, out, summary = _run_method(recipe, set_, "doremi", stage, out, lambda: DoremiConfig(
        stage=stage, tokens=_tokens(tokens), reference=reference, step_size=step_size, smoothing=smoothing,
        start=start, target=target, verify_seeds=_seeds(verify_seeds, "--verify-seeds"), workers=workers,
        threads=threads, keep_models=keep_models), run_doremi)
    print_doremi(summary, console)
    console.print(f"recipe snippet: {out / 'best_mixture.yaml'}  summary: {out / 'summary.json'}", highlight=False)


def print_doremi(summary: dict, console) -> None:
    from rich.table import Table

    names, proxy = summary["sources"], summary["proxy"]
    console.print(f"DoReMi proxy: {proxy['steps']} steps, {proxy['tokens']:,} tokens; reference on "
                  f"{summary['settings']['reference']} weights", highlight=False)
    table = Table(title="domain weights" + (f" ({summary['target']}, measured)" if summary.get("verify") else ""))
    table.add_column("mixture")
    for n in names:
        table.add_column(n, justify="right")
    verify = summary.get("verify") or {}
    if verify:
        table.add_column("measured (mean ± std over seeds)", justify="right")
    rows = [("doremi (averaged)", summary["mixtures"]["doremi"], verify.get("doremi")),
            ("proxy's last step", proxy["final"], None),
            ("recipe", summary["mixtures"]["recipe"], verify.get("recipe")),
            ("uniform", summary["mixtures"]["uniform"], verify.get("uniform"))]
    for label, mixture, measured in rows:
        extra = [f"{measured['mean']:.4f} ± {measured['std']:.4f}" if measured else ""] if verify else []
        table.add_row(label, *(f"{mixture.get(n, 0.0):.3f}" for n in names), *extra)
    console.print(table)


@mix_app.command("value")
def value(
    recipe: RecipeArg,
    stage: StageOpt,
    candidate: Annotated[str, typer.Option(help="A source of the recipe, or a path of documents (a new source).")],
    fraction: Annotated[float, typer.Option(help="Share of the anneal's tokens from the candidate.")] = 0.3,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; one control + one candidate anneal each.")]
    = "1,2,3",
    tokens: TokensOpt = None,
    start: StartOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Source name for a path candidate (default: file name).",
                                                show_default=False)] = None,
    domain: Annotated[Optional[str], typer.Option(help="Domain tag for a path candidate (default: its name).",
                                                  show_default=False)] = None,
    text_field: Annotated[str, typer.Option(help="jsonl field of a path candidate's text.")] = "text",
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Valuation dir (anneals are reused). Default "
                                                     "RUN/mix/value-<stage>.", show_default=False)] = None,
    keep_models: KeepOpt = False,
    set_: SetOpt = None,
) -> None:
    """Microanneal valuation: the stage's start checkpoint annealed with and without the candidate at --fraction,
    same tokens and seed; metric deltas as mean ± std over seeds. Default --tokens: a tenth of the stage's."""
    from midtrain.mix.value import ValueConfig, run_value

    cfg, out, summary = _run_method(recipe, set_, "value", stage, out, lambda: ValueConfig(
        stage=stage, candidate=candidate, fraction=fraction, seeds=_seeds(seeds, "--seeds"), tokens=_tokens(tokens),
        start=start, name=name, domain=domain, text_field=text_field, workers=workers, threads=threads,
        keep_models=keep_models), run_value)
    print_value(summary, console)
    label = f"{summary['candidate']['name']}-f{cfg.fraction:g}"
    console.print(f"summary: {out / (label + '.json')}", highlight=False)


def print_value(summary: dict, console) -> None:
    from rich.table import Table

    from midtrain.eval.keys import MetricKey

    cand, s = summary["candidate"], summary["settings"]
    table = Table(title=f"candidate {cand['name']} at {s['fraction']:.0%} vs the stage's mixture: "
                        f"{s['tokens']:,} tokens, seeds {','.join(map(str, s['seeds']))}")
    for col in ("metric", "control", "with candidate", "delta (mean ± std)", ""):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, d in summary["deltas"].items():
        if MetricKey.parse(metric).task == "ppl":
            continue  # exp(loss): the loss rows say the same
        good = (d["delta"] > 0) == d["higher_is_better"] and d["delta"] != 0
        clear = abs(d["delta"]) > d["delta_std"]  # beyond one std of the seed-to-seed spread
        verdict = ("better" if good else "worse") + ("" if clear or len(s["seeds"]) < 2 else " (within noise)")
        table.add_row(metric, f"{d['control']:.4f} ± {d['control_std']:.4f}",
                      f"{d['candidate']:.4f} ± {d['candidate_std']:.4f}",
                      f"{d['delta']:+.4f} ± {d['delta_std']:.4f}", verdict if d["delta"] != 0 else "same")
    console.print(table)
