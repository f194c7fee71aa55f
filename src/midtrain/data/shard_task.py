"""One shard of a sharded tokenization (data/sharded_tokenize.py): a datatrove task that tokenizes its pieces.

`WORK/shard-<i>/` receives every document the shard keeps, in order (tokens.bin, mask.bin for instruction sources,
lens.npy), the characters of every document it batched (chars.npy), and state.json: its holdout candidates (the
documents whose content hash is among the `holdout_docs` smallest of the shard so far), skip counts and first examples
with their stream positions, decontamination counts. `DONE` is written atomically last; a task finding it returns.
The reading, batching and encoding are tokenize_source's, so the tokens are the same.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from midtrain.data.decontam import Decontaminator
from midtrain.data.instruct import InstructionFormat
from midtrain.data.sources import (
    MAX_EXAMPLES,
    SkipReport,
    documents_of_records,
    is_remote,
    iter_jsonl_lines,
    records_of_units,
)
from midtrain.data.tokenize import content_digest, encode_in_order, instruction_samples, token_dtype
from midtrain.io import write_text_atomic


@dataclass(frozen=True)
class Piece:
    """A contiguous part of one unit: lines [first_line, first_line + lines) from byte `start` (None: to the end)."""

    unit: str
    start: int = 0
    first_line: int = 1
    lines: int | None = None


def piece_records(piece: Piece, skips: SkipReport, columns: list[str] | None) -> Iterator[tuple[dict, str]]:
    if piece.start or piece.lines is not None:
        return iter_jsonl_lines(piece.unit, skips, start=piece.start, first_line=piece.first_line,
                                lines=piece.lines)
    return records_of_units([piece.unit if is_remote(piece.unit) else Path(piece.unit)], skips, columns)




# --------------------------------------------------------------------------- one shard


@dataclass
class _Skips(SkipReport):
    """A SkipReport that also keeps its first examples with where they happened in the document stream, so the merge
    can order the shards' examples as one process would have met them."""

    position: int = 0  # documents put into encode batches so far (read-time skips happen at this position)
    events: list[list] = field(default_factory=list)  # [kind, position, example]; kind "read" or "write"

    def add(self, reason: str, location: str) -> None:
        self.add_at("read", self.position, reason, location)

    def add_at(self, kind: str, position: int, reason: str, location: str) -> None:
        super().add(reason, location)
        if sum(e[0] == kind for e in self.events) < MAX_EXAMPLES:
            self.events.append([kind, position, f"{location}: {reason}"])


@dataclass
class ShardJob:
    """Everything a shard task needs (pickled to the worker processes)."""

    work: str
    plan: list[list[Piece]]
    text_field: str
    tokenizer: object
    holdout_docs: int
    decontaminator: Decontaminator | None
    instruction: InstructionFormat | None
    chunk_chars: int
    # encoder threads per task when tasks share a machine (None: the tokenizer's default, all cores): N workers each
    # with an all-core thread pool fight over the cores (measured 2.7x slower per shard with 2 workers on 2 cores)
    threads: int | None = None


class _Shard:
    """Writes one shard's documents in order and notes the holdout candidates (a local copy of the holdout rule)."""

    def __init__(self, out: Path, k: int, dtype: np.dtype, with_mask: bool):
        self.k, self.dtype = k, dtype
        self.f = open(out / "tokens.bin", "wb")
        self.mask_f = open(out / "mask.bin", "wb") if with_mask else None
        self.lens: list[int] = []
        self.heap: list[int] = []  # negated digests: a max-heap of the k smallest seen
        self.held: set[int] = set()
        self.special: list[list] = []  # [document index, digest hex]

    def add(self, digest: int) -> None:
        # A document the global rule holds out (now or later) is among the k smallest of every prefix of the stream
        # that contains it, so of this shard's prefix too: the shard's candidates include every global one.
        if digest in self.held:
            self.special.append([len(self.lens), f"{digest:x}"])
        elif len(self.heap) < self.k or (self.k and digest < -self.heap[0]):
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, -digest)
            else:
                self.held.discard(-heapq.heapreplace(self.heap, -digest))
            self.held.add(digest)
            self.special.append([len(self.lens), f"{digest:x}"])

    def close(self) -> None:
        self.f.close()
        if self.mask_f is not None:
            self.mask_f.close()


def tokenize_shard(job: ShardJob, rank: int) -> None:
    out = Path(job.work) / f"shard-{rank:05d}"
    if (out / "DONE").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)  # a task killed mid-write left a partial shard: start it over
    out.mkdir(parents=True)
    t0 = time.monotonic()
    if job.threads is not None:  # read when the encoder first runs in parallel: a fresh worker has not yet
        os.environ["RAYON_NUM_THREADS"] = str(job.threads)
        if job.threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok, decon, instruction = job.tokenizer, job.decontaminator, job.instruction
    dtype = token_dtype(len(tok))
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    tail = [tok.eos_token_id] if tok.eos_token_id is not None else []
    skips = _Skips()
    if decon is not None:
        decon.reset_counts()
    shard = _Shard(out, job.holdout_docs, dtype, instruction is not None)
    pieces = job.plan[rank]
    chars: list[int] = []
    try:
        if instruction is not None:  # as tokenize_source: record by record, skips in record order
            for piece in pieces:
                for text, ids, mask in instruction_samples(piece_records(piece, skips, None), tok, instruction,
                                                           decon, skips):
                    shard.add(content_digest(text))
                    shard.lens.append(len(ids))
                    ids.astype(dtype).tofile(shard.f)
                    mask.tofile(shard.mask_f)
        else:
            def batches() -> Iterator[list[tuple[str, str]]]:  # the same batches as tokenize_source's
                batch, size = [], 0
                for piece in pieces:
                    records = piece_records(piece, skips, [job.text_field])
                    for doc in documents_of_records(records, job.text_field, skips):
                        text = doc.text if decon is None else decon.check(doc.text, doc.location).text
                        if text is None:
                            continue
                        batch.append((text, doc.location))
                        chars.append(len(text))
                        skips.position += 1
                        size += len(text)
                        if size >= job.chunk_chars:
                            yield batch
                            batch, size = [], 0
                if batch:
                    yield batch

            written = 0  # documents of finished batches (positions of write-time skips)

            def write(batch: list[tuple[str, str]], flat: np.ndarray, lens: np.ndarray) -> None:
                nonlocal written
                for j, ((text, loc), n) in enumerate(zip(batch, lens.tolist())):
                    if n == 0:
                        skips.add_at("write", written + j, "no_tokens", loc)
                        continue
                    shard.add(content_digest(text))
                    shard.lens.append(n)
                flat.tofile(shard.f)
                written += len(batch)

            encode_in_order(tok, batches(), head, tail, dtype, write)
    finally:
        shard.close()
    np.save(out / "lens.npy", np.asarray(shard.lens, dtype=np.int64))
    np.save(out / "chars.npy", np.asarray(chars, dtype=np.int64))
    decon_state = None if decon is None else {
        "documents": decon.documents, "dropped": decon.dropped, "redacted": decon.redacted,
        "stats": [{"documents_hit": s.documents_hit, "ngrams_matched": s.ngrams_matched,
                   "items_hit": sorted(s.items_hit), "examples": s.examples} for s in decon.stats]}
    n_tokens = int(sum(shard.lens))
    state = {"documents": len(shard.lens), "tokens": n_tokens, "batched": skips.position,
             "seconds": round(time.monotonic() - t0, 3), "skips": skips.counts, "events": skips.events,
             "special": shard.special, "decontamination": decon_state}
    write_text_atomic(out / "state.json", json.dumps(state))
    write_text_atomic(out / "DONE", json.dumps({k: state[k] for k in ("documents", "tokens", "seconds")}))


class ShardTask(PipelineStep):
    """datatrove step: task `rank` tokenizes shard `rank` of the plan."""

    name = "midtrain tokenize shard"
    type = "🔢 - TOKENIZE"

    def __init__(self, job: ShardJob):
        super().__init__()
        self.job = job

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tokenize_shard(self.job, rank)
        return iter(())


