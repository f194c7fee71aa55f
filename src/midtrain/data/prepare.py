"""Recipe -> tokenized sources: curated inputs, decontamination, instruction rendering, epoch checks, reports.

What `midtrain run` (through `midtrain.run.setup.tokenize_all`) and `midtrain data inspect` share. Reports go to
`RUN/data/` (CONTRACTS §5): `tokenize.json` (per source: documents, tokens, skipped records with file:line examples)
and `decontamination.json` (per source and benchmark: documents hit, n-grams matched, examples).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midtrain.config import Recipe
from midtrain.data import sharded_tokenize as sharded
from midtrain.data.decontam import Decontaminator
from midtrain.data.errors import DataError
from midtrain.data.instruct import InstructionFormat, add_special_tokens
from midtrain.data.mixture import bucket_of, source_buckets
from midtrain.data.pretokenized import open_pretokenized
from midtrain.data.token_files import is_pretokenized
from midtrain.data.tokenize import TokenizedSource, default_cache_dir, tokenize_source
from midtrain.io import write_json_atomic
from midtrain.layout import RunLayout

log = logging.getLogger("midtrain")


def run_layout(recipe: Recipe) -> RunLayout:
    return RunLayout(recipe.run_dir if recipe.run_dir is not None else Path("runs") / "recipe")


def curated_dir(recipe: Recipe) -> Path:
    """Where `midtrain data curate` writes curated jsonl.gz, one directory per source."""
    c = recipe.curation
    return Path(c.output) if c is not None and c.output is not None else run_layout(recipe).curated


def curated_sources(recipe: Recipe) -> list[str]:
    c = recipe.curation
    if c is None:
        return []
    text = [s.name for s in recipe.sources if s.type == "text" and not is_pretokenized(s)]  # token files: as they are
    return [n for n in (c.sources or text) if n in text]


def source_input(recipe: Recipe, name: str) -> tuple[Path, str]:
    """(path, text field) a source is tokenized from: its curated output when the recipe curates it, else itself."""
    source = next(s for s in recipe.sources if s.name == name)
    if name not in curated_sources(recipe):
        return source.path, source.text_field
    out = curated_dir(recipe) / name
    if not (out / "_SUCCESS").is_file():
        raise DataError(f"{out}: no curated data for source {name!r}; run `midtrain data curate RECIPE` first "
                        "(the recipe's `curation` block names it)")
    return out / "output", "text"  # datatrove's JsonlWriter keeps the text under "text"


def build_decontaminator(recipe: Recipe) -> Decontaminator | None:
    d = recipe.decontaminate
    if d is None:
        return None
    return Decontaminator(d.benchmarks, ngram=d.ngram, mode=d.mode, min_matches=d.min_matches, fields=d.fields)


def apply_special_tokens(recipe: Recipe, tokenizer) -> int:
    """Adds the recipe's `special_tokens` to the tokenizer (in place); the model's embeddings must grow to match."""
    return add_special_tokens(tokenizer, list(recipe.special_tokens)) if recipe.special_tokens else 0


def tokenize_recipe_sources(recipe: Recipe, tokenizer, *, cache_dir: Path | None = None,
                            report_dir: Path | None = None, on_source=None,
                            on_progress=None, workers: int | None = None) -> list[TokenizedSource]:
    """Tokenize (or load from the cache) every source of the recipe, in recipe order; write reports.
    `on_source(source)` is called as each one is ready, `on_progress(name, documents, tokens)` now and then while a
    source is being tokenized (and decontaminated). A large text source (or any, with `workers` > 1) is tokenized in
    shards by local worker processes (data/sharded_tokenize.py: the same cache, byte for byte)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    decon = build_decontaminator(recipe)
    out: list[TokenizedSource] = []
    read_from: dict[str, str] = {}  # what this run read (a shared cache records whoever filled it first)
    for s in recipe.sources:
        if is_pretokenized(s):  # read in place by memory map (data/pretokenized.py), never copied into the cache
            read_from[s.name] = str(s.path)
            out.append(open_pretokenized(s, tokenizer, cache_dir=cache))
            if out[-1].skips.total:
                log.warning("source %r: %s", s.name, out[-1].skips)
            if on_source is not None:
                on_source(out[-1])
            continue
        instruction = None
        if s.type == "instruction":
            instruction = InstructionFormat(s.prompt_field, s.response_field, s.messages_field, s.template)
        path, text_field = source_input(recipe, s.name)
        read_from[s.name] = str(path)
        if sharded.wants_shards(path, workers):  # a cached source returns at once either way
            out.append(sharded.tokenize_sharded(
                s.name, path, text_field, tokenizer, holdout_docs=s.holdout_docs, cache_dir=cache,
                decontaminator=decon if s.decontaminate else None, instruction=instruction,
                workers=workers or sharded.local_workers(), shards=sharded.default_shards(workers),
                on_shard=None if on_progress is None else sharded.progress_adapter(on_progress)))
        else:
            out.append(tokenize_source(
                s.name, path, text_field, tokenizer, holdout_docs=s.holdout_docs,
                cache_dir=cache, decontaminator=decon if s.decontaminate else None, instruction=instruction,
                progress=None if on_progress is None else functools.partial(on_progress, s.name)))
        if out[-1].skips.total:
            log.warning("source %r: %s", s.name, out[-1].skips)
        if on_source is not None:
            on_source(out[-1])
    if report_dir is not None:
        write_reports(out, report_dir, read_from)
    return out


def write_reports(sources: list[TokenizedSource], report_dir: Path, read_from: dict[str, str] | None = None) -> None:
    """`report_dir` is a run's data/ directory (RunLayout.data); `read_from` the path each source was read from in
    this run (else the path recorded in the shared cache, which may be another run's)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(report_dir.parent)
    write_json_atomic(layout.tokenize_report, {
        s.name: {"cache": str(s.directory), "path": (read_from or {}).get(s.name, s.meta["path"]),
                 "n_docs": s.n_docs, "n_tokens": s.n_tokens,
                 "loss_tokens": s.meta.get("loss_tokens", s.n_tokens), "holdout": s.meta["holdout"],
                 "skips": s.skips.to_dict()}
        for s in sources
    })
    decon = {s.name: _as_read_here(s.meta["decontamination"], s.meta["path"], (read_from or {}).get(s.name))
             for s in sources if s.meta.get("decontamination")}
    if decon:
        write_json_atomic(layout.decontamination_report, decon)


def _as_read_here(report: dict, cached_path: str, read_path: str | None) -> dict:
    """A cached report's file:line locations named by the path this run read (the same bytes: the cache key)."""
    if not read_path or read_path == cached_path:
        return report
    return json.loads(json.dumps(report).replace(json.dumps(cached_path)[1:-1], json.dumps(read_path)[1:-1]))


@dataclass
class SourceUse:
    stage: str
    source: str
    weight: float
    planned_tokens: int
    source_tokens: int
    epochs_cumulative: float  # cursors carry over between stages, so epochs add up along the run
    max_epochs: float | None

    @property
    def over_cap(self) -> bool:
        return self.max_epochs is not None and self.epochs_cumulative > self.max_epochs + 1e-9


def data_warnings(recipe: Recipe, sources: list[TokenizedSource]) -> list[str]:
    """What a user should hear before training on this data: sources read more than once over the run, and sources
    whose evaluation hold-out is a large share of their documents."""
    out = []
    last: dict[str, SourceUse] = {}
    for use in mixture_usage(recipe, sources):
        last[use.source] = use
    for use in last.values():
        if use.epochs_cumulative > 1.5 and not use.over_cap:  # caps are errors already (check_epoch_caps)
            out.append(f"source {use.source!r} repeats: {use.epochs_cumulative:.1f} epochs by the end of stage "
                       f"{use.stage!r} (`midtrain data inspect` shows it per stage; add data, lower its weight, or cap "
                       "it with max_epochs)")
    for s in sources:
        held = int(s.meta.get("holdout", {}).get("n_docs", 0))
        if held and held >= 0.2 * (held + s.n_docs):
            out.append(f"source {s.name!r}: {held} of its {held + s.n_docs} documents are held out for evaluation "
                       "(holdout_docs); a small source trains on more of itself with a lower holdout_docs")
    return out


def mixture_usage(recipe: Recipe, sources: list[TokenizedSource]) -> list[SourceUse]:
    """Planned tokens per stage and source, and the epochs they add up to (plan steps, not the raw budget)."""
    sizes = {s.name: s.n_tokens for s in sources}
    caps = {s.name: s.max_epochs for s in recipe.sources}
    consumed: dict[str, float] = {}
    rows = []
    for i, stage in enumerate(recipe.stages):
        planned_total = stage.steps * stage.batch.tokens
        for name, w in sorted(recipe.effective_mixture(i).items()):
            planned = round(planned_total * w)
            consumed[name] = consumed.get(name, 0) + planned
            rows.append(SourceUse(stage.name, name, w, planned, sizes[name], consumed[name] / max(1, sizes[name]),
                                  caps[name]))
    return rows


@dataclass
class BucketUse:
    stage: str
    source: str
    lo: int
    hi: int | None
    share: float  # of the source's tokens in the stage
    stage_share: float  # of the stage's tokens
    planned_tokens: int
    bucket_tokens: int  # tokens of the source's documents in this length range
    documents: int
    epochs_cumulative: float  # the source's epochs before the stage + this bucket's epochs in it
    max_epochs: float | None

    @property
    def label(self) -> str:
        return f"[{self.lo:,}, {'inf' if self.hi is None else f'{self.hi:,}'})"

    @property
    def over_cap(self) -> bool:
        return self.max_epochs is not None and self.epochs_cumulative > self.max_epochs + 1e-9


def bucket_usage(recipe: Recipe, sources: list[TokenizedSource]) -> list[BucketUse]:
    """Planned tokens per stage, source and length bucket (stages with `length_buckets` / `upsample_long`)."""
    by_name = {s.name: s for s in sources}
    stages = {s.name: s for s in recipe.stages}
    rows = []
    for u in mixture_usage(recipe, sources):
        src = by_name[u.source]
        buckets = source_buckets(stages[u.stage].data, src)
        if not buckets:
            continue
        before = u.epochs_cumulative - u.planned_tokens / max(1, u.source_tokens)
        lengths = np.diff(np.asarray(src.offsets, dtype=np.int64))
        which = bucket_of(lengths, buckets)
        for b, (lo, hi, share) in enumerate(buckets):
            inside = lengths[which == b]
            planned, tokens = round(u.planned_tokens * share), int(inside.sum())
            epochs = planned / tokens if tokens else float("inf") if planned else 0.0
            rows.append(BucketUse(u.stage, u.source, lo, hi, share, u.weight * share, planned, tokens, len(inside),
                                  before + epochs, u.max_epochs))
    return rows


def check_epoch_caps(recipe: Recipe, sources: list[TokenizedSource]) -> list[str]:
    """Problems (sources or length buckets planned beyond their `max_epochs`, buckets without documents)."""
    problems = []
    for u in mixture_usage(recipe, sources):
        if u.over_cap:
            problems.append(f"source {u.source!r} reaches {u.epochs_cumulative:.2f} epochs by the end of stage "
                            f"{u.stage!r}, above its max_epochs={u.max_epochs} ({u.source_tokens} tokens)")
    for b in bucket_usage(recipe, sources):
        if b.share > 0 and not b.documents:
            problems.append(f"stage {b.stage!r}: source {b.source!r} has no documents of {b.label} tokens for its "
                            f"length bucket (share {b.share:g})")
        elif b.over_cap:
            problems.append(f"source {b.source!r}: its documents of {b.label} tokens reach "
                            f"{b.epochs_cumulative:.2f} epochs in stage {b.stage!r}, above max_epochs={b.max_epochs}")
    return problems
