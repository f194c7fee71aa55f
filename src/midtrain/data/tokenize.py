"""Tokenize a source once into a flat token file + document index, cached by content fingerprint.

Layout of `CACHE/tok/<fingerprint>/` (CONTRACTS §5):
  tokens.bin          all training documents back to back, each `[bos] + ids + [eos]` (uint16, or uint32 for
                      vocabularies of 65,536 or more: uint16 silently corrupts them, REFERENCE §7)
  docs.npy            int64 offsets into tokens.bin, n_docs + 1 entries
  holdout_tokens.bin  the held-out documents (same format), sorted by content hash
  holdout_docs.npy
  meta.json           counts, dtype, fingerprints, skip report
The directory is built under a temporary name and renamed into place, so a crash never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from midtrain.data.errors import DataError
from midtrain.data.sources import SkipReport, iter_documents, list_files
from midtrain.data.tokenizer import tokenizer_fingerprint
from midtrain.io import sha256_file

FORMAT_VERSION = 1
CHUNK_CHARS = 4 << 20  # texts per encode call: big enough to keep the Rust threads busy, small enough for RAM


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIDTRAIN_CACHE", Path.home() / ".cache" / "midtrain"))


def source_fingerprint(path: Path, text_field: str, tokenizer: PreTrainedTokenizerBase, holdout_docs: int) -> str:
    """Everything that determines the cache contents; the source's name is not part of it (renaming is free)."""
    path = Path(path)
    files = list_files(path)
    base = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, text_field, tokenizer_fingerprint(tokenizer), holdout_docs]).encode())
    for f in files:
        h.update(json.dumps([f.relative_to(base).as_posix(), sha256_file(f)]).encode())
    return h.hexdigest()


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of raw texts. A literal "<|eos|>" inside a document stays text: only the packer places specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # Call the backend directly (no attention masks, no offsets); toggle special-token parsing off for the call.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


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
    tokens: np.ndarray  # flat training tokens (memory-mapped)
    offsets: np.ndarray  # int64, n_docs + 1
    holdout_tokens: np.ndarray
    holdout_offsets: np.ndarray
    skips: SkipReport
    meta: dict = field(repr=False)
    cache_hit: bool = False

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
        )


class _Writer:
    """Streams training documents to disk while keeping the `k` smallest content hashes aside as the holdout.

    A bounded max-heap makes the split independent of file order without a second pass over the data. Exact
    duplicates of a held-out document are held out with it, so its text never reaches the training stream.
    """

    def __init__(self, f, k: int):
        self.f, self.k = f, k
        self.offsets = [0]
        self.heap: list[list] = []  # [-hash, hash, tokens, copies]
        self.held: dict[int, list] = {}

    def _train(self, tokens: np.ndarray, copies: int = 1) -> None:
        for _ in range(copies):
            tokens.tofile(self.f)
            self.offsets.append(self.offsets[-1] + len(tokens))

    def add(self, digest: int, tokens: np.ndarray) -> None:
        if digest in self.held:
            self.held[digest][3] += 1
        elif len(self.heap) < self.k:
            entry = [-digest, digest, tokens, 1]
            heapq.heappush(self.heap, entry)
            self.held[digest] = entry
        elif self.k and digest < self.heap[0][1]:
            entry = [-digest, digest, tokens, 1]
            evicted = heapq.heapreplace(self.heap, entry)
            del self.held[evicted[1]]
            self.held[digest] = entry
            self._train(evicted[2], evicted[3])
        else:
            self._train(tokens)

    def holdout(self) -> tuple[list[np.ndarray], int]:
        entries = sorted(self.heap, key=lambda e: e[1])
        return [e[2] for e in entries], sum(e[3] - 1 for e in entries)


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def tokenize_source(
    name: str,
    path: Path,
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    holdout_docs: int,
    cache_dir: Path | None = None,
) -> TokenizedSource:
    """Tokenize `path` (or load it from the cache) into a `TokenizedSource`."""
    if holdout_docs < 0:
        raise ValueError(f"source {name!r}: holdout_docs={holdout_docs} must be >= 0")
    path = Path(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = source_fingerprint(path, text_field, tokenizer, holdout_docs)
    final = root / "tok" / fp
    if (final / "meta.json").exists():
        return TokenizedSource.load(name, final)

    dtype = token_dtype(len(tokenizer))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    skips = SkipReport()
    tmp = root / "tok" / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            writer = _Writer(f, holdout_docs)
            batch: list = []
            size = 0

            def flush() -> None:
                for doc, ids in zip(batch, _encode(tokenizer, [d.text for d in batch])):
                    if not ids and not head and not tail:
                        skips.add("no_tokens", doc.location)
                        continue
                    tokens = np.array(head + ids + tail, dtype=dtype)
                    digest = int.from_bytes(hashlib.sha256(doc.text.encode("utf-8")).digest(), "big")
                    writer.add(digest, tokens)
                batch.clear()

            for doc in iter_documents(path, text_field, skips):
                batch.append(doc)
                size += len(doc.text)
                if size >= CHUNK_CHARS:
                    flush()
                    size = 0
            flush()
            f.flush()
            os.fsync(f.fileno())
        held, held_dups = writer.holdout()
        n_train = len(writer.offsets) - 1
        if n_train == 0:
            n_read = len(held) + held_dups
            raise DataError(
                f"{path}: source {name!r} has no training documents "
                f"({n_read} read, holdout_docs={holdout_docs}; {skips})"
            )
        offsets = np.asarray(writer.offsets, dtype=np.int64)
        h_offsets = np.zeros(len(held) + 1, dtype=np.int64)
        h_offsets[1:] = np.cumsum([len(t) for t in held])
        _fsync_write(tmp / "docs.npy", lambda f: np.save(f, offsets))
        _fsync_write(tmp / "holdout_docs.npy", lambda f: np.save(f, h_offsets))
        _fsync_write(tmp / "holdout_tokens.bin", lambda f: [t.tofile(f) for t in held])
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
        }
        _fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return TokenizedSource.load(name, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenizedSource.load(name, final, cache_hit=False)
