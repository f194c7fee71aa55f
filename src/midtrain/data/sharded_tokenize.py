"""Tokenize one raw source as N independent shard tasks, then merge them into exactly today's cache.

The result is byte-identical to `tokenize.tokenize_source` for the same source, tokenizer, holdout and
decontamination settings (tokens.bin, docs.npy, holdout files, masks; meta.json adds only `producer`).

Shard plan (fixed by the source's bytes and N): read the source's units (`sources.list_units`, in order) as one
stream of bytes, cut it at i/N of its size (i = 1..N-1), and move each cut forward to the next record boundary: the
next line start inside a local plain `.jsonl` file, the end of the unit for anything else (.jsonl.gz, parquet, .txt,
HF dataset dirs and remote files are never split). Empty shards are dropped, so a source may get fewer than N.

Each shard is one task (`shard_task.ShardTask`, a datatrove PipelineStep run by the same executors as curation:
local processes, Slurm, Ray) writing `WORK/shard-<i>/`: its documents in order, its holdout candidates (a superset of
the global holdout's members in it), its skip examples with their stream positions, its decontamination counts, and
last, atomically, `DONE`. A re-run skips shards that have it.

The merge replays the single-process holdout rule (a bounded heap of the smallest hashes; a document leaving the
heap joins the training stream, with its copies, at that moment) over the shards' candidates only, then copies the
training documents' token ranges in that order into a temp dir that is renamed into place. Work dir:
`CACHE/tok-shards/<fingerprint>-<N>/`, removed after a successful merge.
"""

from __future__ import annotations

import heapq
import json
import mmap
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midtrain.data import tokenize as tok_mod
from midtrain.data.decontam import MAX_EXAMPLES as DECON_EXAMPLES
from midtrain.data.decontam import Decontaminator
from midtrain.data.errors import DataError
from midtrain.data.executors import pipeline_executor
from midtrain.data.instruct import InstructionFormat
from midtrain.data.shard_task import Piece, ShardJob, ShardTask
from midtrain.data.sources import (
    MAX_EXAMPLES,
    SkipReport,
    is_remote,
    list_files,
    list_units,
)
from midtrain.data.tokenize import (
    TokenizedSource,
    cache_key,
    new_temp_dir,
    open_cached,
    publish_cache,
    token_dtype,
)
from midtrain.io import write_text_atomic

PLAN_VERSION = 1
COPY_ELEMS = 1 << 24  # tokens per write while merging: bounded memory whatever the shard size
MIN_AUTO_BYTES = 64 << 20  # `midtrain run` shards sources at least this large (smaller ones finish in seconds)
MIN_AUTO_CPUS = 4  # ... on machines with at least this many cores (wants_shards)


# --------------------------------------------------------------------------- plan


def _unit_bytes(unit) -> int:
    if is_remote(unit):
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(unit))
        return int(fs.size(p))
    return sum(Path(f).stat().st_size for f in list_files(unit)) if Path(unit).is_dir() else Path(unit).stat().st_size


def _line_starts(file: Path, cuts: list[int]) -> list[tuple[int, int]]:
    """For each cut (bytes, ascending): (the first line start at or after it, or the file size; its line number)."""
    out, pos, newlines = [], 0, 0
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for cut in cuts:
            if cut > pos:
                nl = mm.find(b"\n", cut - 1)
                start = nl + 1 if nl >= 0 else len(mm)
                for a in range(pos, start, COPY_ELEMS):  # newlines before `start`, counted in bounded chunks
                    newlines += mm[a:min(start, a + COPY_ELEMS)].count(b"\n")
                pos = start
            out.append((pos, newlines + 1))
    return out


def plan_shards(path: Path | str, shards: int) -> list[list[Piece]]:
    """The shard plan of a source (module docstring): per shard, its pieces in document order."""
    if shards < 1:
        raise ValueError(f"shards={shards} must be >= 1")
    units = list_units(path)
    sizes = [_unit_bytes(u) for u in units]
    total = sum(sizes)
    ends = np.cumsum(sizes).tolist()
    # boundaries as (unit index, byte, line): (u, 0, 1) is the start of unit u
    bounds: set[tuple[int, int, int]] = {(0, 0, 1), (len(units), 0, 1)}
    cuts_in: dict[int, list[int]] = {}
    for i in range(1, shards):
        cut = i * total // shards
        u = next(j for j, e in enumerate(ends) if cut < e) if cut < total else len(units)
        local = cut - (ends[u] - sizes[u]) if u < len(units) else 0
        splittable = u < len(units) and not is_remote(units[u]) and str(units[u]).endswith(".jsonl")
        if local == 0 or u == len(units):
            bounds.add((u, 0, 1))
        elif splittable:
            cuts_in.setdefault(u, []).append(local)
        else:
            bounds.add((u + 1, 0, 1))
    for u, cuts in cuts_in.items():
        for start, line in _line_starts(Path(units[u]), sorted(set(cuts))):
            bounds.add((u + 1, 0, 1) if start >= sizes[u] else (u, start, line))
    ordered = sorted(bounds)
    plan = []
    for (u0, b0, l0), (u1, b1, l1) in zip(ordered, ordered[1:]):
        pieces = [Piece(str(units[u0]), b0, l0, (l1 - l0) if u1 == u0 else None)]
        pieces += [Piece(str(units[u])) for u in range(u0 + 1, min(u1 + (b1 > 0), len(units)))]
        if u1 > u0 and b1 > 0:  # the shard ends inside unit u1
            pieces[-1] = Piece(str(units[u1]), 0, 1, l1 - 1)
        plan.append(pieces)
    return plan


# --------------------------------------------------------------------------- merge


def _skip_report(states: list[dict], chunk_chars: int, work: Path) -> SkipReport:
    """The shards' skip counts and examples, the examples in the order one process adds them: read-time skips while
    batch b is read, write-time ones (no_tokens) when batch b is written, i.e. after batch b + ENCODE_AHEAD is read."""
    counts: dict[str, int] = {}
    events = []
    base = 0
    for st in states:
        for reason, n in st["skips"].items():
            counts[reason] = counts.get(reason, 0) + n
        events += [(kind, base + pos, len(events), example) for kind, pos, example in st["events"]]
        base += st["batched"]
    if {e[0] for e in events} == {"read", "write"}:  # only then does the batch timing change the order
        cum = np.cumsum(np.concatenate([np.load(work / f"shard-{s:05d}" / "chars.npy") for s in range(len(states))]))
        closed, done = [], 0  # batch b ends after document closed[b] - 1 (batches close at chunk_chars)
        while True:
            j = int(np.searchsorted(cum, done + chunk_chars, side="left"))
            if j >= len(cum):
                break
            closed.append(j + 1)
            done = int(cum[j])
        phase = lambda p: int(np.searchsorted(closed, p, side="right"))  # noqa: E731
        events.sort(key=lambda e: (phase(e[1]), 0, e[2]) if e[0] == "read"
                    else (phase(e[1]) + tok_mod.ENCODE_AHEAD, 1, e[2]))
    return SkipReport(dict(sorted(counts.items())), [e[3] for e in events[:MAX_EXAMPLES]])


def _decontamination(decon: Decontaminator | None, states: list[dict]) -> dict | None:
    if decon is None:
        return None
    decon.reset_counts()
    for st in states:  # shard order is document order, so the first examples stay the first
        d = st["decontamination"]
        decon.documents += d["documents"]
        decon.dropped += d["dropped"]
        decon.redacted += d["redacted"]
        for mine, theirs in zip(decon.stats, d["stats"]):
            mine.documents_hit += theirs["documents_hit"]
            mine.ngrams_matched += theirs["ngrams_matched"]
            mine.items_hit.update(theirs["items_hit"])
            mine.examples = (mine.examples + theirs["examples"])[:DECON_EXAMPLES]
    return decon.report()


def _open(path: Path, dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)


def merge_shards(work: Path, tmp: Path, k: int, dtype: np.dtype, with_mask: bool, n_shards: int):
    """Write tokens.bin (+ mask.bin) into `tmp` in the single-process order; returns (offsets, held, held_dups)."""
    shards = []
    for s in range(n_shards):
        d = work / f"shard-{s:05d}"
        lens = np.load(d / "lens.npy")
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        shards.append((lens, offsets, _open(d / "tokens.bin", dtype, int(offsets[-1])),
                       _open(d / "mask.bin", np.uint8, int(offsets[-1])) if with_mask else None))
    # Replay the holdout rule over the candidates; everything between them is trained in place.
    heap: list[list] = []  # [-digest, digest, (shard, doc), copies]
    held: dict[int, list] = {}
    pieces: list[list[int]] = []  # [shard, first doc, end doc, copies]

    def train(s: int, lo: int, hi: int, copies: int = 1) -> None:
        if hi <= lo:
            return
        if copies == 1 and pieces and pieces[-1][0] == s and pieces[-1][2] == lo and pieces[-1][3] == 1:
            pieces[-1][2] = hi  # contiguous with the last piece: one copy instead of two
        else:
            pieces.append([s, lo, hi, copies])

    for s in range(n_shards):
        prev = 0
        for i, hex_digest in json.loads((work / f"shard-{s:05d}" / "state.json").read_text())["special"]:
            train(s, prev, i)
            prev = i + 1
            digest = int(hex_digest, 16)
            if digest in held:
                held[digest][3] += 1
            elif len(heap) < k or (k and digest < heap[0][1]):
                entry = [-digest, digest, (s, i), 1]
                if len(heap) < k:
                    heapq.heappush(heap, entry)
                else:
                    evicted = heapq.heapreplace(heap, entry)
                    del held[evicted[1]]
                    train(evicted[2][0], evicted[2][1], evicted[2][1] + 1, evicted[3])
                held[digest] = entry
            else:
                train(s, i, i + 1)
        train(s, prev, len(shards[s][0]))

    def copy(out, which: int) -> None:
        for s, lo, hi, copies in pieces:
            data, offsets = shards[s][which], shards[s][1]
            for _ in range(copies):
                for a in range(int(offsets[lo]), int(offsets[hi]), COPY_ELEMS):
                    out.write(memoryview(np.ascontiguousarray(data[a:min(int(offsets[hi]), a + COPY_ELEMS)])))
        out.flush()
        os.fsync(out.fileno())

    with open(tmp / "tokens.bin", "wb") as f:
        copy(f, 2)
    if with_mask:
        with open(tmp / "mask.bin", "wb") as f:
            copy(f, 3)
    lens = [np.repeat(shards[s][0][lo:hi], copies) for s, lo, hi, copies in pieces]
    offsets = np.zeros(1 + sum(len(x) for x in lens), dtype=np.int64)
    np.cumsum(np.concatenate(lens) if lens else np.zeros(0, np.int64), out=offsets[1:])

    def doc(s: int, i: int, which: int) -> np.ndarray:
        return np.array(shards[s][which][shards[s][1][i] : shards[s][1][i + 1]])

    entries = sorted(heap, key=lambda e: e[1])
    out_held = [(doc(*e[2], 2), doc(*e[2], 3) if with_mask else None) for e in entries]
    return offsets, out_held, sum(e[3] - 1 for e in entries)


# --------------------------------------------------------------------------- run


@dataclass
class ShardDone:
    """One progress line's worth: shard `index` of `total` is complete (`reused`: by an earlier run)."""

    source: str
    index: int
    total: int
    documents: int
    tokens: int
    seconds: float
    reused: bool = False


class _Progress:
    """Reports each shard once as its DONE marker appears (any executor: the markers are on the shared disk)."""

    def __init__(self, name: str, work: Path, total: int, on_shard: Callable[[ShardDone], None] | None):
        self.name, self.work, self.total, self.on_shard = name, work, total, on_shard
        self.seen: set[int] = set()
        self.lock = threading.Lock()

    def sweep(self, reused: bool = False) -> None:
        with self.lock:
            for i in range(self.total):
                marker = self.work / f"shard-{i:05d}" / "DONE"
                if i in self.seen or not marker.is_file():
                    continue
                self.seen.add(i)
                d = json.loads(marker.read_text())
                if self.on_shard is not None:
                    self.on_shard(ShardDone(self.name, i, self.total, d["documents"], d["tokens"], d["seconds"],
                                            reused))

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            self.sweep()


def tokenize_sharded(
    name: str,
    path: Path | str,
    text_field: str,
    tokenizer,
    *,
    holdout_docs: int,
    shards: int,
    workers: int = 1,
    cache_dir: Path | None = None,
    decontaminator: Decontaminator | None = None,
    instruction: InstructionFormat | None = None,
    executor: str = "local",
    slurm: dict | None = None,
    on_shard: Callable[[ShardDone], None] | None = None,
    keep_work: bool = False,
) -> TokenizedSource:
    """`tokenize_source`'s result (same cache directory, same bytes), computed as `shards` tasks on `executor`.

    `on_shard` is called once per shard as it completes (or, `reused`, when an earlier run completed it);
    `keep_work` keeps the shards after the merge (they are the size of the cache)."""
    path, root, fp = cache_key(name, path, text_field, tokenizer, holdout_docs, cache_dir, decontaminator,
                               instruction)
    cached = open_cached(name, root, fp)
    if cached is not None:
        return cached
    plan = plan_shards(path, shards)
    work = root / "tok-shards" / f"{fp}-{shards}"
    plan_json = json.dumps({"version": PLAN_VERSION, "chunk_chars": tok_mod.CHUNK_CHARS,
                            "shards": [[vars(p) for p in pieces] for pieces in plan]}, indent=1)
    if not (work / "shard_plan.json").is_file() or (work / "shard_plan.json").read_text() != plan_json:
        shutil.rmtree(work, ignore_errors=True)  # another plan's shards cannot be merged with this one's
        work.mkdir(parents=True)
        write_text_atomic(work / "shard_plan.json", plan_json)
    logs = work / "logs"
    for i in range(len(plan)):  # datatrove skips tasks with a completion marker: only shards with DONE keep theirs
        if not (work / f"shard-{i:05d}" / "DONE").is_file():
            (logs / "completions" / f"{i:05d}").unlink(missing_ok=True)
    # worker processes on this machine share its cores; tasks run in this process (1 worker) keep its settings
    threads = max(1, local_workers() // workers) if executor == "local" and workers > 1 else None
    job = ShardJob(str(work), plan, text_field, tokenizer, holdout_docs, decontaminator, instruction,
                   tok_mod.CHUNK_CHARS, threads)
    progress = _Progress(name, work, len(plan), on_shard)
    progress.sweep(reused=True)
    # spawn: a fresh interpreter per local worker (a forkserver outlived its parent before: issue 24)
    ex = pipeline_executor(executor, [ShardTask(job)], tasks=len(plan), workers=workers, logs=logs, slurm=slurm,
                           job_name=f"midtrain-tokenize-{name}", start_method="spawn")
    stop = threading.Event()
    watcher = threading.Thread(target=progress.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        ex.run()
        if executor == "slurm":  # sbatch returned at once: wait for the tasks (or name the failed one)
            from midtrain.data.curate_slurm import wait_for_chain

            wait_for_chain([ex], work / f"shard-{len(plan) - 1:05d}" / "DONE")
    except Exception as exc:
        raise DataError(f"source {name!r}: a tokenization task failed: {exc} (task logs: {logs}/logs/; completed "
                        f"shards are kept in {work} and skipped when you run again)") from exc
    finally:
        stop.set()
        watcher.join()
    progress.sweep()
    missing = [i for i in range(len(plan)) if not (work / f"shard-{i:05d}" / "DONE").is_file()]
    if missing:
        raise DataError(f"source {name!r}: shards {missing} of {work} did not complete (task logs: {logs}/logs/)")

    states = [json.loads((work / f"shard-{i:05d}" / "state.json").read_text()) for i in range(len(plan))]
    dtype = token_dtype(len(tokenizer))
    tmp = new_temp_dir(root, fp)
    try:
        offsets, held, held_dups = merge_shards(work, tmp, holdout_docs, dtype, instruction is not None, len(plan))
        out = publish_cache(tmp, root / "tok" / fp, name=name, path=path, text_field=text_field,
                            tokenizer=tokenizer, offsets=offsets, held=held, held_dups=held_dups,
                            holdout_docs=holdout_docs, skips=_skip_report(states, tok_mod.CHUNK_CHARS, work),
                            instruction=instruction, decontamination=_decontamination(decontaminator, states),
                            producer={"sharded": len(plan), "executor": executor,
                                      "task_seconds": round(sum(s["seconds"] for s in states), 3)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)  # the cache holds it all now
    return out


def local_workers() -> int:
    """Worker processes for `midtrain run`'s sharded path: one per core (each encodes with its own threads too)."""
    return max(1, os.cpu_count() or 1)


def default_shards(workers: int | None) -> int:
    """Shards per source: a few per worker, so a slow shard does not leave the other workers idle for long."""
    return 4 * (workers or local_workers())


def progress_adapter(on_progress: Callable[[str, int, int], None]) -> Callable[[ShardDone], None]:
    """`on_shard` for a `tokenize_recipe_sources`-style `on_progress(name, documents, tokens)`: running totals."""
    totals = {"documents": 0, "tokens": 0}

    def on_shard(done: ShardDone) -> None:
        totals["documents"] += done.documents
        totals["tokens"] += done.tokens
        on_progress(done.source, totals["documents"], totals["tokens"])

    return on_shard


def wants_shards(path: Path | str, workers: int | None) -> bool:
    """Whether `midtrain run` tokenizes a source in shards: when given workers > 1; else when the source is local and
    holds at least MIN_AUTO_BYTES (smaller ones take seconds) and this machine has MIN_AUTO_CPUS cores. (On a 2-vCPU
    machine two CPU-bound processes ran at 0.44x each, so two workers did not beat one there: benchmarks/
    tokenize_shards.py.)"""
    if workers is not None:
        return workers > 1
    if local_workers() < MIN_AUTO_CPUS or is_remote(path):
        return False
    try:
        return sum(_unit_bytes(u) for u in list_units(path)) >= MIN_AUTO_BYTES
    except (OSError, DataError):
        return False  # the single-process path reports the problem with the data as it always has
