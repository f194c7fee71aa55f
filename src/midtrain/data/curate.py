"""Curation with datatrove: heuristic quality filters, exact and MinHash near-dedup, per-step statistics.

We compose datatrove's own blocks (REFERENCE §7) and add only a reader over our sources and a stats summary. For
each curated source the chain of datatrove jobs is (each job a separate executor, `depends=` the previous one):

  filter   SourceReader -> Gopher repetition / Gopher quality / C4 / FineWeb filters -> work/filtered/*.jsonl.gz
  exact    signatures -> find duplicates (1 task) -> filter                          -> work/exact/
  minhash  signatures -> buckets (1 task per bucket) -> cluster (1 task) -> filter     -> OUT/<source>/output/
  finish   (1 task) summarise every job's stats.json into RUN/data/curation/<source>.json, write OUT/<source>/_SUCCESS

Executors: datatrove's LocalPipelineExecutor by default; SlurmPipelineExecutor / RayPipelineExecutor when the recipe's
`curation.executor` says so (docs/DATA.md shows a cluster run). On Slurm, `curate` submits the chain and waits for it
(curate_slurm.py). Completed tasks are skipped on a re-run (datatrove's completion markers), so an interrupted
curation resumes.

Offline: the word tokenizers of the Gopher filters and MinHash are spaCy's `blank` pipelines (no model download).
The C4 bad-words list and fastText language ID download at run time and are therefore not offered here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from datatrove.data import Document as DTDocument
from datatrove.pipeline.base import PipelineStep

from midtrain import faults
from midtrain.config import Recipe, Source
from midtrain.config.recipe import CurationConfig
from midtrain.data.errors import DataError
from midtrain.data.executors import pipeline_executor
from midtrain.data.prepare import curated_dir, curated_sources, run_layout
from midtrain.data.sources import SkipReport, iter_documents


class SourceReader(PipelineStep):
    """Our sources (jsonl/jsonl.gz/parquet/txt/HF dirs) as datatrove documents; rank r reads documents i ≡ r mod W."""

    name = "midtrain source reader"
    type = "📖 - READER"

    def __init__(self, path: str, text_field: str = "text"):
        super().__init__()
        self.path, self.text_field = path, text_field

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        skips = SkipReport()
        for i, doc in enumerate(iter_documents(self.path, self.text_field, skips)):
            if i % world_size != rank:
                continue
            faults.point("curate.mid_write")  # test-only: a kill while the filter job writes its outputs
            with self.track_time():
                self.stat_update("documents")
                yield DTDocument(text=doc.text, id=str(i), metadata={"location": doc.location})
        for reason, count in skips.counts.items():
            if rank == 0:
                self.stat_update(f"skipped_{reason}", value=count)


class FinishStep(PipelineStep):
    """Last job: summarise datatrove's per-job stats.json files and mark the source's output complete."""

    name = "midtrain curation summary"
    type = "📊 - STATS"

    def __init__(self, source: str, log_dirs: list[str], summary: str, success: str):
        super().__init__()
        self.source, self.log_dirs, self.summary, self.success = source, log_dirs, summary, success

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        steps = summarise([Path(d) for d in self.log_dirs])
        Path(self.summary).parent.mkdir(parents=True, exist_ok=True)
        from midtrain.io import write_json_atomic, write_text_atomic

        write_json_atomic(Path(self.summary), {"source": self.source, "steps": steps})
        write_text_atomic(Path(self.success), "ok\n")
        return iter(())


def document_text(doc: DTDocument) -> str:
    """Exact dedup's content key (module level: executors pickle it)."""
    return doc.text


def _hash_config():
    # datatrove 0.10's default xxhash path passes str to xxhash >= 4, which rejects it ("Strings must be encoded
    # before hashing"); sha1 (64-bit) hashes str itself and is what datatrove used before xxhash became default.
    from datatrove.utils.hashing import HashConfig

    return HashConfig(precision=64, hash_fc="sha1")


def summarise(log_dirs: list[Path]) -> list[dict[str, Any]]:
    """Per pipeline step: documents in, kept and removed (with removal reasons), from datatrove's stats.json."""
    rows = []
    for log_dir in log_dirs:
        stats_file = log_dir / "stats.json"
        if not stats_file.is_file():
            continue
        for step in json.loads(stats_file.read_text()):
            s = step.get("stats", {})
            # Ray/Slurm merge per-task stats files, turning each counter into {"total": N, "unit": "task", ...}
            s = {k: v["total"] if isinstance(v, dict) and v.get("unit") == "task" else v for k, v in s.items()}
            flat = {k: v for k, v in s.items() if isinstance(v, (int, float))}
            row: dict[str, Any] = {"job": log_dir.name, "step": step["name"]}
            if "total" in flat and ("forwarded" in flat or "dropped" in flat):
                row.update(documents=flat["total"], kept=flat.get("forwarded", 0), removed=flat.get("dropped", 0),
                           reasons={k.removeprefix("dropped_"): v for k, v in flat.items()
                                    if k.startswith("dropped_")})
            else:
                row["stats"] = flat
            rows.append(row)
    return rows


WEB_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
# Domains whose documents are curated already and which web heuristics wipe out (measured on the demo's data:
# gopher_quality kept 1 of 53 prose documents and 2 of 471 code documents; C4 removed the rest).
CURATED_DOMAINS = frozenset({"math", "code", "qa", "reasoning", "science", "instruct", "instruction", "chat", "sft",
                             "books", "papers", "wiki", "wikipedia"})


def source_filters(cfg: CurationConfig, source: Source) -> list[str]:
    """The filters that curate `source`: its `per_source` entry, else the recipe's list, else (auto) the web filters
    unless its domain is one of the curated ones."""
    if source.name in cfg.per_source:
        return list(cfg.per_source[source.name])
    if cfg.filters != "auto":
        return list(cfg.filters)
    return [] if source.domain_name.lower() in CURATED_DOMAINS else list(WEB_FILTERS)


def _filters(names: list[str], language: str) -> list[PipelineStep]:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    make = {
        "gopher_repetition": lambda: GopherRepetitionFilter(language=language),
        "gopher_quality": lambda: GopherQualityFilter(language=language),
        "c4": lambda: C4QualityFilter(language=language),
        "fineweb": lambda: FineWebQualityFilter(language=language),
    }
    return [make[name]() for name in names]


def build_jobs(cfg: CurationConfig, source: Source, *, work: Path, out: Path, summary: Path, seed: int,
               fresh: bool = False) -> list:
    """The chain of executors for one source, filter job first; running the last runs or submits the chain.

    `work` holds datatrove's intermediate outputs and logs, `out` the curated data (`out/output`, `out/_SUCCESS`),
    `summary` what each filter kept and removed."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    source_name = source.name
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    logs, T = work / "logs", cfg.tasks
    jobs: list = []

    def add(pipeline: list, tasks: int, name: str) -> None:
        jobs.append(pipeline_executor(cfg.executor, pipeline, tasks=tasks, logs=logs / name, workers=cfg.workers,
                                      slurm=cfg.slurm, depends=jobs[-1] if jobs else None,
                                      job_name=f"midtrain-{source_name}-{name}"))

    stage_out = work / "filtered"
    filters = _filters(source_filters(cfg, source), cfg.language)
    add([SourceReader(str(source.path), source.text_field), *filters, JsonlWriter(str(stage_out))], T, "filter")
    if cfg.exact_dedup:
        exact = ExactDedupConfig(content_getter=document_text, hash_config=_hash_config())
        add([JsonlReader(str(stage_out)), ExactDedupSignature(str(work / "exact_sigs"), config=exact)], T,
            "exact-signatures")
        add([ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact)], 1, "exact-find")
        add([JsonlReader(str(stage_out)), ExactDedupFilter(str(work / "exact_dups"), config=exact),
             JsonlWriter(str(work / "exact"))], T, "exact-filter")
        stage_out = work / "exact"
    final_out = out / "output"
    if cfg.minhash:
        mh = MinhashConfig(n_grams=cfg.minhash_ngram, num_buckets=cfg.minhash_buckets,
                           hashes_per_bucket=cfg.minhash_hashes_per_bucket, seed=seed + 1,
                           hash_config=_hash_config())
        add([JsonlReader(str(stage_out)), MinhashDedupSignature(str(work / "mh_sigs"), config=mh,
                                                                language=cfg.language)], T, "minhash-signatures")
        add([MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh)],
            cfg.minhash_buckets, "minhash-buckets")
        add([MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=mh)], 1,
            "minhash-cluster")
        add([JsonlReader(str(stage_out)), MinhashDedupFilter(str(work / "mh_remove")), JsonlWriter(str(final_out))],
            T, "minhash-filter")
    else:
        add([JsonlReader(str(stage_out)), JsonlWriter(str(final_out))], T, "copy")
    log_dirs = [str(logs / d) for d in ("filter", "exact-signatures", "exact-find", "exact-filter",
                                        "minhash-signatures", "minhash-buckets", "minhash-cluster",
                                        "minhash-filter", "copy")]
    add([FinishStep(source_name, log_dirs, str(summary), str(out / "_SUCCESS"))], 1, "finish")
    return jobs


def curate(recipe: Recipe, *, only: list[str] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run (local) or submit and wait for (Slurm/Ray) the curation of every curated source; returns the summaries, each
    with `removal` (documents in, kept, removed per filter, `warning` above `curation.warn_removed`).

    Run locally, the filter job runs first: a source the filters empty is an error naming it and its filters, not a
    crash of the next job on an empty directory (on Slurm/Ray the chain is submitted whole and checked by its logs).
    """
    cfg = recipe.curation
    if cfg is None:
        raise ValueError("the recipe has no `curation` block (docs/DATA.md)")
    names = curated_sources(recipe)
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"not curated text sources: {unknown} (curated: {names})")
        names = list(only)
    results: dict[str, Any] = {}
    layout = run_layout(recipe)
    for name in names:
        source = next(s for s in recipe.sources if s.name == name)
        summary = layout.curation_summary(name)
        jobs = build_jobs(cfg, source, work=layout.curation_work(name), out=curated_dir(recipe) / name,
                          summary=summary, seed=recipe.seed, fresh=fresh)
        if cfg.executor == "local":
            jobs[0].run()
            removal = filter_removal(layout.curation_work(name) / "logs" / "filter", source_filters(cfg, source))
            if removal["documents"] and not removal["kept"]:
                raise DataError(f"curation of source {name!r}: its filters removed all {removal['documents']} "
                                f"documents ({describe_removal(removal)}); give it other filters "
                                f"(curation.per_source: {{{name}: [...]}}, [] for none) or check its text field")
        jobs[-1].run()
        if cfg.executor == "slurm":  # sbatch returned at once: wait for the chain, or report its failed task
            from midtrain.data.curate_slurm import wait_for_chain

            wait_for_chain(jobs, curated_dir(recipe) / name / "_SUCCESS")
        if not summary.is_file():
            results[name] = {"submitted": True}
            continue
        results[name] = json.loads(summary.read_text())
        removal = filter_removal(layout.curation_work(name) / "logs" / "filter", source_filters(cfg, source))
        share = 1 - removal["kept"] / removal["documents"] if removal["documents"] else 0.0
        if share > cfg.warn_removed:
            removal["warning"] = (f"curation removed {share:.0%} of source {name!r} ({describe_removal(removal)}); "
                                  "if it is curated data, give it fewer filters (curation.per_source)")
        results[name]["removal"] = removal
    return results


def filter_removal(log_dir: Path, filters: list[str]) -> dict[str, Any]:
    """Documents into the filter job, documents kept, and the removals of each filter (datatrove's stats)."""
    rows = summarise([log_dir])
    documents = next((r["stats"].get("documents", 0) for r in rows if "stats" in r and "documents" in r["stats"]), 0)
    per_filter = [(_step_name(r["step"]), r["removed"]) for r in rows if "removed" in r]
    kept = per_filter and next(r["kept"] for r in reversed(rows) if "kept" in r)
    return {"documents": int(documents), "kept": int(kept if per_filter else documents), "filters": filters,
            "removed": dict(per_filter)}


def _step_name(step: str) -> str:
    """datatrove's "🔻 - FILTER: 🥇 Gopher Quality" as "Gopher Quality"."""
    return step.rpartition(":")[2].strip().lstrip("".join({c for c in step if not c.isascii()})).strip()


def describe_removal(removal: dict[str, Any]) -> str:
    removed = ", ".join(f"{step}: {n}" for step, n in removal["removed"].items()) or "no filter removed any"
    return f"{removal['kept']} of {removal['documents']} kept; {removed}"
