"""`midtrain data ...`: decontaminate, train a tokenizer, curate with datatrove, tokenize ahead of a run, inspect a
recipe's mixtures.

Heavy modules (torch, transformers, datatrove, spaCy) are imported inside the commands so `midtrain --help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from midtrain.cli.common import EXIT_RUN, SetOpt, console, escape, fail, load_recipe_or_exit

data_app = typer.Typer(no_args_is_help=True, help="Prepare data: decontaminate, tokenizer, curate, tokenize, "
                        "inspect.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
data_app.add_typer(tokenizer_app, name="tokenizer")



@data_app.command("decontaminate")
def decontaminate(
    inputs: Annotated[list[Path], typer.Argument(help="Data files or directories (jsonl, jsonl.gz, parquet, txt, "
                                                      "saved HF datasets).")],
    benchmarks: Annotated[list[Path], typer.Option("--benchmarks", "-b", help="Benchmark file: jsonl with "
                                                   "prompt/answer fields, or plain text (repeatable).")],
    out: Annotated[Path, typer.Option(help="Output directory: kept documents in the inputs' format + report.json.")],
    ngram: Annotated[int, typer.Option(help="Word n-gram length.")] = 13,
    mode: Annotated[str, typer.Option(help="drop: remove contaminated documents; redact: cut the matched spans.")]
    = "drop",
    text_field: Annotated[str, typer.Option(help="Field holding the document text.")] = "text",
    field: Annotated[Optional[list[str]], typer.Option(help="Benchmark jsonl field(s) to index (default: prompt, "
                                                            "question, answer, solution, ...).")] = None,
    min_matches: Annotated[int, typer.Option(help="Matched n-grams that make a document contaminated.")] = 1,
) -> None:
    """Remove benchmark overlap from data files by word n-gram matching; writes OUT/report.json."""
    from midtrain.data.decontam import Decontaminator, decontaminate_paths
    from midtrain.data.errors import DataError

    try:
        decon = Decontaminator(benchmarks, ngram=ngram, mode=mode, min_matches=min_matches,  # type: ignore[arg-type]
                               fields=field)
        report = decontaminate_paths(inputs, decon, out, text_field)
    except (DataError, ValueError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    console.print(f"{report['documents']} documents: {report['dropped']} dropped, {report['redacted']} redacted "
                  f"({ngram}-grams, mode {mode})")
    for b in report["benchmarks"]:
        console.print(f"  {b['name']}: {b['documents_hit']} documents hit, {b['ngrams_matched']} n-grams matched, "
                      f"{b['items_hit']}/{b['items']} items seen", highlight=False)
    if report["skipped"]["counts"]:
        console.print(f"  skipped records: {report['skipped']}", highlight=False)
    console.print(f"wrote {out}/report.json", highlight=False)


@tokenizer_app.command("train")
def tokenizer_train(
    sources: Annotated[list[Path], typer.Argument(help="Data files or directories to train on.")],
    vocab: Annotated[int, typer.Option(help="Vocabulary size (>= 259: 256 bytes + specials).")],
    out: Annotated[Path, typer.Option(help="Directory to save the tokenizer in (AutoTokenizer loads it).")],
    text_field: Annotated[str, typer.Option(help="Field holding the document text.")] = "text",
    max_docs: Annotated[Optional[int], typer.Option(help="Train on at most this many documents.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT directory.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer (HF tokenizers) for from-scratch bases."""
    import itertools

    from midtrain.data.errors import DataError
    from midtrain.data.sources import SkipReport, iter_documents
    from midtrain.data.tokenizer import train_bpe
    from midtrain.io import publish_dir

    if out.exists() and any(out.iterdir()) and not force:
        fail(escape(f"{out}: exists and is not empty (use --force to replace it)"), EXIT_RUN)
    skips = SkipReport()
    try:
        docs = itertools.chain.from_iterable(iter_documents(s, text_field, skips) for s in sources)
        texts = (d.text for d in itertools.islice(docs, max_docs))
        tok = train_bpe(texts, vocab)
    except (DataError, ValueError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    publish_dir(out, tok.save_pretrained)
    console.print(f"trained byte-level BPE: {len(tok)} tokens -> {out}" + (f"; {skips}" if skips.total else ""),
                  highlight=False)


@data_app.command("curate")
def curate_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file with a `curation` block.")],
    set_: SetOpt = None,
    source: Annotated[Optional[list[str]], typer.Option(help="Curate only these sources (repeatable).")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard earlier curation output and start over.")] = False,
) -> None:
    """Run the recipe's datatrove curation (filters, exact + MinHash dedup); stats go to RUN/data/curation/."""
    from midtrain.data.errors import DataError

    rec = load_recipe_or_exit(recipe, set_)
    try:
        from midtrain.data.curate import curate

        results = curate(rec, only=source, fresh=fresh)
    except (DataError, ValueError, ImportError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    from rich.table import Table

    for name, res in results.items():
        if res.get("submitted"):
            console.print(f"{name}: submitted to {rec.curation.executor}")
            continue
        table = Table(title=f"curation of {name}")
        for col in ("job", "step", "documents", "kept", "removed", "reasons"):
            table.add_column(col)
        for row in res["steps"]:
            if "documents" in row:
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(row["reasons"].items()))
                table.add_row(row["job"], row["step"], str(row["documents"]), str(row["kept"]), str(row["removed"]),
                              reasons)
        console.print(table)
    removals = {name: res["removal"] for name, res in results.items() if "removal" in res}
    if removals:  # the line a user reads first: what the filters did to each source
        summary = Table(title="curation filters per source (dedup removals are in the tables above)")
        for col in ("source", "filters", "documents", "kept", "removed"):
            summary.add_column(col, justify="left" if col in ("source", "filters") else "right")
        for name, r in removals.items():
            share = 1 - r["kept"] / r["documents"] if r["documents"] else 0.0
            summary.add_row(name, ", ".join(r["filters"]) or "none", str(r["documents"]), str(r["kept"]),
                            f"{share:.0%}")
        console.print(summary)
        for r in removals.values():
            if "warning" in r:
                console.print(f"[yellow]warning:[/] {escape(r['warning'])}")


@data_app.command("tokenize")
def tokenize_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Tasks run at once (default: the recipe's "
                                                   "curation.workers, else one per core).")] = None,
    shards: Annotated[Optional[int], typer.Option(min=1, help="Shards per source (default: 4 per worker). The "
                                                  "cache is the same for any number.")] = None,
) -> None:
    """Tokenize every text source of the recipe into the shared cache ahead of `midtrain run`, in shards run as
    parallel tasks (the recipe's curation.executor: local processes, Slurm or Ray); completed shards are kept."""
    import time

    from midtrain.data.errors import DataError

    rec = load_recipe_or_exit(recipe, set_)
    try:
        from midtrain.data.instruct import InstructionFormat
        from midtrain.data.prepare import apply_special_tokens, build_decontaminator, source_input
        from midtrain.data.pretokenized import is_pretokenized
        from midtrain.data.sharded_tokenize import default_shards, local_workers, tokenize_sharded
        from midtrain.data.tokenize import default_cache_dir
        from midtrain.run import RunError, resolve_tokenizer

        tokenizer = resolve_tokenizer(rec)
        apply_special_tokens(rec, tokenizer)  # as `midtrain run` does: the same tokenizer, the same cache key
        decon = build_decontaminator(rec)
        cfg = rec.curation
        n_workers = workers or (cfg.workers if cfg is not None else local_workers())
        n_shards = shards or default_shards(n_workers)
        start, docs, tokens = time.perf_counter(), 0, 0

        def on_shard(done) -> None:
            how = "done earlier, kept" if done.reused else f"{done.seconds:.1f} s"
            console.print(f"{done.source}: shard {done.index + 1}/{done.total}: {done.documents:,} documents, "
                          f"{done.tokens:,} tokens ({how})", highlight=False)

        for s in rec.sources:
            if is_pretokenized(s):
                console.print(f"{s.name}: pre-tokenized, read in place by `midtrain run`: skipped", highlight=False)
                continue
            instruction = None if s.type != "instruction" else \
                InstructionFormat(s.prompt_field, s.response_field, s.messages_field, s.template)
            path, text_field = source_input(rec, s.name)
            src = tokenize_sharded(s.name, path, text_field, tokenizer, holdout_docs=s.holdout_docs,
                                   shards=n_shards, workers=n_workers, cache_dir=default_cache_dir(),
                                   decontaminator=decon if s.decontaminate else None, instruction=instruction,
                                   executor=cfg.executor if cfg is not None else "local",
                                   slurm=cfg.slurm if cfg is not None else None, on_shard=on_shard)
            docs, tokens = docs + src.n_docs, tokens + src.n_tokens
            state = "cached already" if src.cache_hit else "tokenized"
            console.print(f"{s.name}: {state}: {src.n_docs:,} documents, {src.n_tokens:,} tokens -> "
                          f"{src.directory}", highlight=False)
    except (DataError, ValueError, RunError, ImportError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    seconds = time.perf_counter() - start
    console.print(f"total: {docs:,} documents, {tokens:,} tokens in {seconds:.1f} s "
                  f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)", highlight=False)


@data_app.command("inspect")
def inspect_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOpt = None,
) -> None:
    """Per stage and source: weight, planned tokens, source size, epochs; warns about repeats and epoch caps."""
    from rich.table import Table

    from midtrain.data.errors import DataError

    rec = load_recipe_or_exit(recipe, set_)
    try:
        from midtrain.data.prepare import apply_special_tokens, mixture_usage, tokenize_recipe_sources
        from midtrain.run import RunError, resolve_tokenizer

        tokenizer = resolve_tokenizer(rec)
        apply_special_tokens(rec, tokenizer)
        sources = tokenize_recipe_sources(rec, tokenizer)
    except (DataError, ValueError, RunError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    table = Table(title=f"mixtures of {recipe}")
    for col in ("stage", "source", "share", "planned tokens", "source tokens", "epochs (cumulative)", "cap"):
        table.add_column(col, justify="left" if col in ("stage", "source") else "right")
    warnings = []
    for u in mixture_usage(rec, sources):
        cap = "-" if u.max_epochs is None else f"{u.max_epochs:g}"
        table.add_row(u.stage, u.source, f"{100 * u.weight:.1f}%", f"{u.planned_tokens:,}", f"{u.source_tokens:,}",
                      f"{u.epochs_cumulative:.2f}", cap)
        if u.over_cap:
            warnings.append(f"source {u.source!r} exceeds max_epochs={cap} in stage {u.stage!r} "
                            f"({u.epochs_cumulative:.2f} epochs)")
        elif u.epochs_cumulative > 1:
            warnings.append(f"source {u.source!r} is exhausted and repeats in stage {u.stage!r} "
                            f"({u.epochs_cumulative:.2f} epochs)")
    console.print(table)
    from midtrain.data.prepare import bucket_usage

    buckets = bucket_usage(rec, sources)
    if buckets:
        bt = Table(title="length buckets (document tokens; shares of the source's and of the stage's tokens)")
        for col in ("stage", "source", "bucket", "share", "of stage", "planned tokens", "bucket tokens", "documents",
                    "epochs (cumulative)"):
            bt.add_column(col, justify="left" if col in ("stage", "source", "bucket") else "right")
        for b in buckets:
            bt.add_row(b.stage, b.source, b.label, f"{100 * b.share:.1f}%", f"{100 * b.stage_share:.1f}%",
                       f"{b.planned_tokens:,}", f"{b.bucket_tokens:,}", f"{b.documents:,}",
                       f"{b.epochs_cumulative:.2f}")
            if b.share > 0 and not b.documents:
                warnings.append(f"stage {b.stage!r}: source {b.source!r} has no documents of {b.label} tokens")
            elif b.over_cap:
                warnings.append(f"source {b.source!r}: documents of {b.label} tokens exceed max_epochs="
                                f"{b.max_epochs:g} in stage {b.stage!r} ({b.epochs_cumulative:.2f} epochs)")
            elif b.epochs_cumulative > 1:
                warnings.append(f"source {b.source!r}: documents of {b.label} tokens repeat in stage {b.stage!r} "
                                f"({b.epochs_cumulative:.2f} epochs)")
        console.print(bt)
    for s in sources:
        if s.skips.total:
            warnings.append(f"source {s.name!r}: {s.skips}")
    for w in dict.fromkeys(warnings):
        console.print(f"[yellow]warning:[/] {escape(w)}")
