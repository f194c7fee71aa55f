"""Tokenize a source once into a flat token file + document index, cached by content fingerprint.

Layout of `CACHE/tok/<fingerprint>/` (CONTRACTS §5):
  tokens.bin          all training documents back to back, each `[bos] + ids + [eos]` (uint16, or uint32 for
                      vocabularies of 65,536 or more: uint16 silently corrupts them, REFERENCE §7)
  docs.npy            int64 offsets into tokens.bin, n_docs + 1 entries
  holdout_tokens.bin  the held-out documents (same format), sorted by content hash
  holdout_docs.npy
  mask.bin, holdout_mask.bin   instruction sources only: uint8 per token, 1 = carries loss (response tokens)
  meta.json           counts, dtype, fingerprints, skip report, decontamination report
The directory is built under a temporary name and renamed into place, so a crash never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from midtrain import faults
from midtrain.data.cache_check import cache_problem, file_digests
from midtrain.data.decontam import Decontaminator
from midtrain.data.errors import DataError
from midtrain.data.instruct import InstructionFormat, SkipRecord, encode_record
from midtrain.data.sources import SkipReport, is_remote, iter_documents, iter_records, list_files, open_binary
from midtrain.data.tokenizer import tokenizer_fingerprint
from midtrain.io import sha256_file

log = logging.getLogger("midtrain")

FORMAT_VERSION = 1
CHUNK_CHARS = 4 << 20  # texts per encode call: big enough to keep the Rust threads busy, small enough for RAM
# Encode calls in flight while the next batch is read: the Rust encoder releases the GIL, so reading, hashing and
# writing overlap with encoding, and one batch's tail (its longest documents) overlaps the next batch's start.
ENCODE_AHEAD = 2
PROGRESS_SECONDS = 15.0  # how often a long tokenization says how far it is


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDTRAIN_CACHE", Path.home() / ".cache" / "midtrain"))


def _digest(file) -> str:
    if not is_remote(file):
        return sha256_file(file)
    h = hashlib.sha256()
    with open_binary(file) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_digest(text: str) -> int:
    """A document's holdout key: sha256 of its text as an integer (the holdout is the k smallest)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


def fingerprint_extra(tokenizer: PreTrainedTokenizerBase, decontaminator: Decontaminator | None,
                      instruction: InstructionFormat | None) -> list[str] | None:
    """`source_fingerprint`'s `extra` for these settings (None when there are none)."""
    extra = [f"decontam:{decontaminator.fingerprint}" if decontaminator else "",
             f"instruction:{instruction.fingerprint(tokenizer)}" if instruction else ""]
    return extra if any(extra) else None


def source_fingerprint(path: Path | str, text_field: str, tokenizer: PreTrainedTokenizerBase, holdout_docs: int,
                       extra: list[str] | None = None) -> str:
    """Everything that determines the cache contents; the source's name is not part of it (renaming is free).

    `extra` carries the fingerprints of what else shapes the tokens (decontamination, instruction template).
    """
    files = list_files(path)
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, text_field, tokenizer_fingerprint(tokenizer), holdout_docs]).encode())
    if extra:
        h.update(json.dumps(extra).encode())
    if is_remote(path):
        names = [str(f).removeprefix(str(path).rstrip("/")) for f in files]
    else:
        base = Path(path) if Path(path).is_dir() else Path(path).parent
        names = [Path(f).relative_to(base).as_posix() for f in files]
    for name, f in zip(names, files):
        h.update(json.dumps([name, _digest(f)]).encode())
    return h.hexdigest()


@contextmanager
def literal_specials(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Special-token text inside documents is encoded as text for the duration (toggled once, not per call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        yield
        return
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = previous


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of raw texts. A literal "<|eos|>" inside a document stays text: only the packer places specials.

    Call inside `literal_specials(tokenizer)`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # The backend directly, without offsets: no attention masks, no offset mapping, no BatchEncoding.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def encode_flat(tokenizer: PreTrainedTokenizerBase, texts: list[str], head: list[int], tail: list[int],
                 dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(every document's `head + ids + tail` back to back, their lengths): one array per batch, no per-doc arrays."""
    ids = _encode(tokenizer, texts)
    body_lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(body_lens.sum()))
    if not head and not tail:
        return body, body_lens
    lens = body_lens + len(head) + len(tail)
    ends = np.cumsum(lens)
    starts = ends - lens
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_body = np.ones(len(flat), dtype=bool)
    for j, t in enumerate(head):
        flat[starts + j] = t
        is_body[starts + j] = False
    for j, t in enumerate(tail):
        flat[ends - len(tail) + j] = t
        is_body[ends - len(tail) + j] = False
    flat[is_body] = body
    return flat, lens


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if path.stat().st_size != n * dtype.itemsize:
        raise DataError(f"{path}: size {path.stat().st_size} does not match meta.json; delete the directory to rebuild")
    if n == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray)


@dataclass
class TokenizedSource:
    name: str
    fingerprint: str
    directory: Path
    # flat training tokens (memory-mapped); for a pre-tokenized source over many shards a pretokenized.TokenView
    # (len() and [a:b] within a document, never materialized)
    tokens: np.ndarray
    offsets: np.ndarray  # int64, n_docs + 1
    holdout_tokens: np.ndarray
    holdout_offsets: np.ndarray
    skips: SkipReport
    meta: dict = field(repr=False)
    cache_hit: bool = False
    mask: np.ndarray | None = None  # instruction sources: uint8 per token, 1 = carries loss
    holdout_mask: np.ndarray | None = None

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def holdout_docs(self) -> list[np.ndarray]:
        o = self.holdout_offsets
        return [self.holdout_tokens[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    def holdout_masks(self) -> list[np.ndarray | None]:
        """Per held-out document its loss mask (instruction sources: 1 = response token), else None (all tokens)."""
        o = self.holdout_offsets
        if self.holdout_mask is None:
            return [None] * (len(o) - 1)
        return [self.holdout_mask[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    @classmethod
    def load(cls, name: str, directory: Path, cache_hit: bool = True) -> TokenizedSource:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            dtype = np.dtype(meta["dtype"])
            offsets = np.load(directory / "docs.npy", mmap_mode="r")
            holdout_offsets = np.load(directory / "holdout_docs.npy")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{directory}: unreadable token cache ({e}); delete the directory to rebuild") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{directory}/meta.json: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        return cls(
            name=name,
            fingerprint=meta["fingerprint"],
            directory=directory,
            tokens=_memmap(directory / "tokens.bin", dtype, int(offsets[-1])),
            offsets=offsets,
            holdout_tokens=_memmap(directory / "holdout_tokens.bin", dtype, int(holdout_offsets[-1])),
            holdout_offsets=holdout_offsets,
            skips=SkipReport.from_dict(meta["skips"]),
            meta=meta,
            cache_hit=cache_hit,
            mask=_memmap(directory / "mask.bin", np.dtype(np.uint8), int(offsets[-1])) if meta.get("has_mask")
            else None,
            holdout_mask=_memmap(directory / "holdout_mask.bin", np.dtype(np.uint8), int(holdout_offsets[-1]))
            if meta.get("has_mask") else None,
        )


class _Writer:
    """Streams training documents to disk while keeping the `k` smallest content hashes aside as the holdout.

    A bounded max-heap makes the split independent of file order without a second pass over the data. Exact
    duplicates of a held-out document are held out with it, so its text never reaches the training stream.
    Training documents are buffered (views, in order) and written with one concatenate per `flush()`.
    """

    def __init__(self, f, k: int, mask_f=None):
        self.f, self.k, self.mask_f = f, k, mask_f
        self.offsets = [0]
        self.heap: list[list] = []  # [-hash, hash, (tokens, mask), copies]
        self.held: dict[int, list] = {}
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.pending_tokens = 0

    def _train(self, tokens: tuple[np.ndarray, np.ndarray | None], copies: int = 1) -> None:
        for _ in range(copies):
            self.pending.append(tokens)
            self.pending_tokens += len(tokens[0])
            self.offsets.append(self.offsets[-1] + len(tokens[0]))

    def flush(self) -> None:
        if not self.pending:
            return
        np.concatenate([ids for ids, _ in self.pending]).tofile(self.f)
        if self.mask_f is not None:
            np.concatenate([mask for _, mask in self.pending]).tofile(self.mask_f)
        self.pending.clear()
        self.pending_tokens = 0

    def add(self, digest: int, tokens: tuple[np.ndarray, np.ndarray | None]) -> None:
        if digest in self.held:
            self.held[digest][3] += 1
            return
        if len(self.heap) < self.k or (self.k and digest < self.heap[0][1]):
            # copies: a view would pin its whole batch array for as long as the document stays held out
            entry = [-digest, digest, (tokens[0].copy(), None if tokens[1] is None else tokens[1].copy()), 1]
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, entry)
            else:
                evicted = heapq.heapreplace(self.heap, entry)
                del self.held[evicted[1]]
                self._train(evicted[2], evicted[3])
            self.held[digest] = entry
        else:
            self._train(tokens)

    def holdout(self) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], int]:
        entries = sorted(self.heap, key=lambda e: e[1])
        return [e[2] for e in entries], sum(e[3] - 1 for e in entries)


def fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temps(directory: Path, fp: str) -> None:
    """Temp dirs of this fingerprint left by dead processes (killed mid-write): never loaded, only taking space."""
    for tmp in directory.glob(f".{fp}.tmp-*") if directory.is_dir() else []:
        pid = tmp.name.removeprefix(f".{fp}.tmp-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_cached(name: str, root: Path, fp: str) -> TokenizedSource | None:
    """The cache `root/tok/<fp>` if it is there and intact; a damaged one is removed (the data rebuilds it)."""
    final = root / "tok" / fp
    if not (final / "meta.json").exists():
        return None
    problem = cache_problem(final, root / "verified" / f"{fp}.json")
    if problem is None:
        return TokenizedSource.load(name, final)
    log.warning("%s; re-tokenizing source %r", problem, name)  # the remedy: the cache is rebuilt from the data
    aside = final.with_name(f".{fp}.damaged-{os.getpid()}")
    os.rename(final, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return None


def new_temp_dir(root: Path, fp: str) -> Path:
    """A fresh directory to build the cache of `fp` in (renamed into place by `publish_cache`)."""
    remove_stale_temps(root / "tok", fp)
    tmp = root / "tok" / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish_cache(tmp: Path, final: Path, *, name: str, path: Path | str, text_field: str,
                  tokenizer: PreTrainedTokenizerBase, offsets: np.ndarray,
                  held: list[tuple[np.ndarray, np.ndarray | None]], held_dups: int, holdout_docs: int,
                  skips: SkipReport, instruction: InstructionFormat | None, decontamination: dict | None,
                  producer: dict | None = None) -> TokenizedSource:
    """Complete the cache in `tmp` (tokens.bin and mask.bin written already) and rename it to `final`.

    `held` are the held-out documents sorted by content hash; `producer` (optional) says how the cache was built.
    """
    fp, dtype = final.name, token_dtype(len(tokenizer))
    n_train = len(offsets) - 1
    if n_train == 0:
        n_read = len(held) + held_dups
        raise DataError(
            f"{path}: source {name!r} has no training documents "
            f"({n_read} read, holdout_docs={holdout_docs}; {skips})"
        )
    h_offsets = np.zeros(len(held) + 1, dtype=np.int64)
    h_offsets[1:] = np.cumsum([len(t) for t, _ in held])
    fsync_write(tmp / "docs.npy", lambda f: np.save(f, offsets))
    fsync_write(tmp / "holdout_docs.npy", lambda f: np.save(f, h_offsets))
    fsync_write(tmp / "holdout_tokens.bin", lambda f: [t.tofile(f) for t, _ in held])
    if instruction is not None:
        fsync_write(tmp / "holdout_mask.bin", lambda f: [m.tofile(f) for _, m in held])
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "fingerprint": fp,
        "path": str(path),
        "text_field": text_field,
        "n_docs": n_train,
        "n_tokens": int(offsets[-1]),
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "holdout": {"requested": holdout_docs, "n_docs": len(held), "n_tokens": int(h_offsets[-1]),
                    "duplicates": held_dups},
        "skips": skips.to_dict(),
        "has_mask": instruction is not None,
        "instruction": None if instruction is None else vars(instruction),
        "decontamination": decontamination,
    }
    if instruction is not None:
        mask_total = int(np.fromfile(tmp / "mask.bin", dtype=np.uint8).sum(dtype=np.int64))
        meta["loss_tokens"] = mask_total  # tokens that carry loss (the rest is prompt)
    if producer is not None:
        meta["producer"] = producer
    meta["files"] = file_digests(tmp)  # checked before a later run uses the cache (data/cache_check.py)
    fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same cache first: theirs is identical
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return TokenizedSource.load(name, final)
    return TokenizedSource.load(name, final, cache_hit=False)


def encode_in_order(tokenizer, batches, head: list[int], tail: list[int], dtype, write) -> None:
    """`write(batch, *encode_flat(batch texts))` for each batch of (text, location) pairs, in order, with up to
    ENCODE_AHEAD batches encoding in threads meanwhile (the Rust encoder releases the GIL; Python ones get one)."""
    threads = ENCODE_AHEAD if hasattr(tokenizer, "backend_tokenizer") else 1
    with literal_specials(tokenizer), ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(encode_flat, tokenizer, [t for t, _ in batch], head, tail, dtype)))
                if len(pending) > ENCODE_AHEAD:
                    done, future = pending.popleft()
                    write(done, *future.result())
            while pending:
                done, future = pending.popleft()
                write(done, *future.result())
        finally:
            for _, future in pending:
                future.cancel()


def cache_key(name: str, path, text_field: str, tokenizer, holdout_docs: int, cache_dir: Path | None,
              decontaminator, instruction) -> tuple[Path | str, Path, str]:
    """(path, cache root, fingerprint) of a source: what both tokenizers (one process, shards) look up."""
    if holdout_docs < 0:
        raise ValueError(f"source {name!r}: holdout_docs={holdout_docs} must be >= 0")
    path = path if is_remote(path) else Path(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return path, root, source_fingerprint(path, text_field, tokenizer, holdout_docs,
                                          fingerprint_extra(tokenizer, decontaminator, instruction))


def instruction_samples(records, tokenizer, instruction, decontaminator, skips: SkipReport):
    """(text, ids, mask) of each instruction record that renders and survives decontamination, in record order;
    the others are counted in `skips` (a record that does not render) or dropped (overlap with a benchmark)."""
    for record, loc in records:
        try:
            text, ids, mask = encode_record(record, tokenizer, instruction)
        except SkipRecord as e:
            skips.add(e.reason, loc)
            continue
        if decontaminator is not None and decontaminator.check(text, loc).text != text:
            continue  # redacting inside a prompt/response pair would garble it: drop the sample
        yield text, ids, mask


def tokenize_source(
    name: str,
    path: Path | str,
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    holdout_docs: int,
    cache_dir: Path | None = None,
    decontaminator: Decontaminator | None = None,
    instruction: InstructionFormat | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TokenizedSource:
    """Tokenize `path` (or load it from the cache) into a `TokenizedSource`.

    `decontaminator` drops/redacts benchmark overlap before tokenizing (its report lands in meta.json);
    `instruction` renders prompt/response or chat records with a loss mask instead of reading `text_field`.
    `progress(documents, tokens)` is called with the counts written so far, at most every PROGRESS_SECONDS, while a
    source is tokenized (a large one takes minutes; a cache hit calls nothing).
    """
    path, root, fp = cache_key(name, path, text_field, tokenizer, holdout_docs, cache_dir, decontaminator,
                               instruction)
    final = root / "tok" / fp
    cached = open_cached(name, root, fp)
    if cached is not None:
        return cached

    dtype = token_dtype(len(tokenizer))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    skips = SkipReport()
    if decontaminator is not None:
        decontaminator.reset_counts()
    tmp = new_temp_dir(root, fp)

    def clean(text: str, location: str) -> str | None:
        return text if decontaminator is None else decontaminator.check(text, location).text

    try:
        with open(tmp / "tokens.bin", "wb") as f, \
                (open(tmp / "mask.bin", "wb") if instruction else open(os.devnull, "wb")) as mf:
            writer = _Writer(f, holdout_docs, mf if instruction else None)
            last_report = time.monotonic()

            def report_progress() -> None:
                nonlocal last_report
                if progress is not None and time.monotonic() - last_report >= PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    progress(len(writer.offsets) - 1, writer.offsets[-1])
            if instruction is not None:
                for text, ids, mask in instruction_samples(iter_records(path, skips), tokenizer, instruction,
                                                           decontaminator, skips):
                    writer.add(content_digest(text), (ids.astype(dtype), mask))
                    if writer.pending_tokens >= CHUNK_CHARS:
                        writer.flush()
                        report_progress()
            else:
                def batches() -> Iterator[list[tuple[str, str]]]:
                    batch: list[tuple[str, str]] = []
                    size = 0
                    for doc in iter_documents(path, text_field, skips):
                        text = clean(doc.text, doc.location)
                        if text is None:
                            continue
                        batch.append((text, doc.location))
                        size += len(text)
                        if size >= CHUNK_CHARS:
                            yield batch
                            batch, size = [], 0
                    if batch:
                        yield batch

                def write(batch: list[tuple[str, str]], flat: np.ndarray, lens: np.ndarray) -> None:
                    ends = np.cumsum(lens).tolist()
                    start = 0
                    for (text, loc), end in zip(batch, ends):
                        if end == start:
                            skips.add("no_tokens", loc)
                            continue
                        writer.add(content_digest(text), (flat[start:end], None))
                        start = end
                    writer.flush()
                    faults.point("tokenize.mid_write")  # test-only: tokens.bin partly written, meta.json not
                    report_progress()

                # Encoding runs in worker threads (the Rust encoder releases the GIL) while this thread reads the
                # next batch and writes finished ones, in order.
                encode_in_order(tokenizer, batches(), head, tail, dtype, write)
            writer.flush()
            f.flush()
            os.fsync(f.fileno())
        held, held_dups = writer.holdout()
        return publish_cache(tmp, final, name=name, path=path, text_field=text_field, tokenizer=tokenizer,
                             offsets=np.asarray(writer.offsets, dtype=np.int64), held=held, held_dups=held_dups,
                             holdout_docs=holdout_docs, skips=skips, instruction=instruction,
                             decontamination=None if decontaminator is None else decontaminator.report())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

