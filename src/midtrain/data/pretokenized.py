"""Pre-tokenized sources, read in place (docs/DATA.md "Pre-tokenized corpora"; the files: data/token_files.py).

A source is opened as a `TokenizedSource` whose `tokens` is the mapped file itself (one contiguous span) or a
`TokenView` over spans of many shards; nothing is copied. What the loader needs beyond the files is computed once and
cached in `CACHE/pretok/<fingerprint>/`, so that a warm open reads no index and allocates nothing per document:

  offsets.npy   int64 ends of the training documents in the flat view (n_docs + 1; memory-mapped by the loader)
  spans.npy     int64 (shard, start, length) runs of training documents stored back to back
  holdout.npy   int64 (shard, start, end) of the held-out documents, by hash
  ends-<k>.npy  numpy shards only: document ends found by scanning for EOS
  meta.json     written last (its presence means the rest is complete): the file list with sizes and mtimes (the
                fingerprint: a touched or replaced shard is "data changed" on resume), counts, held-out ids, skips

The first open walks one shard at a time, so its memory is that of the largest shard's index, not the corpus's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from midtrain.data.errors import DataError
from midtrain.data.sources import SkipReport
from midtrain.data.token_files import (
    PRETOKENIZED,
    Shard,
    detect_format,
    eos_ends,
    is_pretokenized,
    open_shards,
    relative_name,
    shard_problems,
    spans_from_ends,
)
from midtrain.data.tokenize import TokenizedSource, default_cache_dir, token_dtype
from midtrain.data.tokenizer import tokenizer_fingerprint
from midtrain.io import fsync_dir, temp_path, write_bytes_atomic, write_json_atomic

log = logging.getLogger("midtrain")

FORMAT_VERSION = 2
HOLDOUT_SEED = 0x6D69647472616996  # the held-out choice depends on file names and document indices only
COUNT_CHUNK = 1 << 24  # tokens per step when counting loss flags

__all__ = ["TokenView", "detect_format", "is_pretokenized", "open_pretokenized", "pretokenized_problems"]


class TokenView:
    """Spans of memory-mapped arrays seen as one flat token sequence: `len()` and `[a:b]`, a numpy view of the
    mapped file when the range lies inside one span (a document always does). Nothing is read until sliced.

    `np.asarray(view)` materializes the whole sequence: for small views (tests) only; the loader keeps views as
    they are."""

    ndim = 1

    def __init__(self, arrays: list[np.ndarray], which: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self._arrays = arrays
        self._which = np.asarray(which, dtype=np.int64)  # per span: its array
        self._starts = np.asarray(starts, dtype=np.int64)  # per span: first index in its array
        self._bounds = np.zeros(len(self._which) + 1, dtype=np.int64)  # per span: first index in the view
        np.cumsum(lengths, out=self._bounds[1:])
        self.dtype = np.result_type(*[a.dtype for a in arrays]) if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._bounds[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def spans(self) -> int:
        return len(self._which)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} tokens")
            return self[i : i + 1][0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenView supports integer indices and contiguous slices [a:b]")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, self.dtype)
        p = int(np.searchsorted(self._bounds, a, "right")) - 1
        lo, hi = int(self._bounds[p]), int(self._bounds[p + 1])
        if b <= hi:
            s = int(self._starts[p]) + a - lo
            return self._arrays[int(self._which[p])][s : s + b - a]
        return np.concatenate([self[a:hi], self[hi:b]]).astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype)


def flat_view(arrays: list[np.ndarray], spans: np.ndarray) -> np.ndarray | TokenView:
    """(shard, start, length) spans as one sequence; a single span is the mapped array itself."""
    if not len(spans):
        return np.zeros(0, arrays[0].dtype if arrays else np.uint16)
    if len(spans) == 1:
        k, s, n = (int(x) for x in spans[0])
        return arrays[k][s : s + n]
    return TokenView(arrays, spans[:, 0], spans[:, 1], spans[:, 2])


# --------------------------------------------------------------------------- recipe-time check


def _expected_eos(config, tokenizer) -> int | None:
    return config.eos_token_id if getattr(config, "eos_token_id", None) is not None else tokenizer.eos_token_id


def _raw_dtype(config, tokenizer) -> np.dtype:
    given = getattr(config, "dtype", None)
    return np.dtype(given) if given else token_dtype(len(tokenizer))


def _problems(fmt: str, shards: list[Shard], config, tokenizer) -> list[str]:
    return shard_problems(fmt, shards, config.path, vocab=len(tokenizer), eos=_expected_eos(config, tokenizer),
                          explicit_eos=getattr(config, "eos_token_id", None) is not None)


def pretokenized_problems(source_config, tokenizer, *, max_shards: int | None = None) -> list[str]:
    """What makes a pre-tokenized source unusable with `tokenizer`, one line each naming the file: unreadable or
    inconsistent files, a token dtype too small for the vocabulary, a token id outside it (in a sampled prefix and
    tail of each shard), documents that end with another id than the EOS. Text sources: []. For recipe checks, which
    sample `max_shards` shards evenly (first and last included); opening the source checks every one."""
    try:
        fmt = detect_format(source_config)
        if fmt not in PRETOKENIZED:
            return []
        if getattr(source_config, "type", "text") != "text":
            return [f"{source_config.path}: {fmt} token files cannot be an instruction source (type: text)"]
        _, _, shards = open_shards(fmt, source_config, _raw_dtype(source_config, tokenizer))
        if max_shards is not None and len(shards) > max_shards:
            shards = [shards[int(i)] for i in np.unique(np.linspace(0, len(shards) - 1, max_shards).round())]
        return _problems(fmt, shards, source_config, tokenizer)
    except (DataError, OSError) as e:
        return [str(e)]


# --------------------------------------------------------------------------- the cached layout


def _fingerprint(fmt: str, config, tokenizer, root: Path, files: list[Path]) -> tuple[str, list[dict]]:
    listed = []
    for f in files:
        st = f.stat()
        listed.append({"name": relative_name(f, root), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    split_eos = _expected_eos(config, tokenizer) if fmt in ("numpy", "datatrove") else None
    key = [FORMAT_VERSION, fmt, config.holdout_docs, split_eos,
           _raw_dtype(config, tokenizer).name if fmt in ("numpy", "datatrove") else None, listed]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest(), listed


def _save_npy(path: Path, array: np.ndarray) -> None:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array))
    write_bytes_atomic(path, out.getvalue())


def _doc_hashes(shard_name: str, n: int) -> np.ndarray:
    """A seeded 64-bit hash of (shard name, document index) for documents 0..n-1, vectorized (splitmix64)."""
    key = int.from_bytes(hashlib.sha256(shard_name.encode()).digest()[:8], "big") ^ HOLDOUT_SEED
    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class _Layout:
    """Walks the shards one at a time: document bounds (EOS-split shards scanned once, their ends cached), then the
    held-out choice, then the training offsets and spans, written straight to the cache directory."""

    def __init__(self, shards: list[Shard], eos: int | None, directory: Path):
        self.shards, self.eos, self.directory = shards, eos, directory

    def bounds(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        sh = self.shards[k]
        if not sh.split_by_eos:
            return sh.bounds()
        if self.eos is None:
            raise DataError(f"{sh.file}: documents are delimited by EOS, but the tokenizer has none (set the "
                            "source's eos_token_id)")
        cached = self.directory / f"ends-{k:05d}.npy"
        try:
            ends = np.load(cached, mmap_mode="r")
        except (OSError, ValueError):
            ends = eos_ends(sh.tokens, self.eos)
            _save_npy(cached, ends)
        return spans_from_ends(ends)

    def holdout(self, want: int) -> tuple[np.ndarray, list[int], SkipReport]:
        """(held-out (shard, local index) rows ordered by hash, documents per shard, empty-document skips)."""
        best = np.zeros((0, 3), dtype=np.uint64)  # (hash, shard, local index)
        counts, skips = [], SkipReport()
        for k, sh in enumerate(self.shards):
            starts, ends = self.bounds(k)
            counts.append(len(ends))
            empty = np.flatnonzero(ends <= starts)
            for i in empty[:5]:
                skips.add("empty", f"{sh.file}:doc {int(i)}")
            if len(empty) > 5:
                skips.counts["empty"] += len(empty) - 5
            if not want:
                continue
            local = np.flatnonzero(ends > starts)
            h = _doc_hashes(sh.name, len(ends))[local]
            if len(local) > want:
                top = np.argpartition(h, want - 1)[:want]
                local, h = local[top], h[top]
            rows = np.stack([h, np.full(len(h), k, np.uint64), local.astype(np.uint64)], axis=1)
            best = np.concatenate([best, rows])
            if len(best) > want:
                best = best[np.lexsort((best[:, 2], best[:, 1], best[:, 0]))[:want]]
        best = best[np.lexsort((best[:, 2], best[:, 1], best[:, 0]))]
        return best[:, 1:].astype(np.int64), counts, skips

    def write_training(self, held: np.ndarray, n_train: int) -> np.ndarray:
        """Writes offsets.npy (streamed) and returns the spans of the training documents."""
        path = self.directory / "offsets.npy"
        tmp = temp_path(path)
        offsets = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n_train + 1,))
        offsets[0], at, total, spans = 0, 1, 0, []
        try:
            for k in range(len(self.shards)):
                starts, ends = self.bounds(k)
                train = ends > starts
                train[held[held[:, 0] == k, 1]] = False
                idx = np.flatnonzero(train)
                if not len(idx):
                    continue
                s, e = starts[idx], ends[idx]
                cum = np.cumsum(e - s)
                offsets[at : at + len(idx)] = total + cum
                at, total = at + len(idx), total + int(cum[-1])
                first = np.ones(len(idx), dtype=bool)
                first[1:] = s[1:] != e[:-1]  # a held-out document (or a gap) starts a new span
                begin = np.flatnonzero(first)
                run_end = np.append(begin[1:], len(idx)) - 1
                lengths = e[run_end] - s[begin]
                spans.append(np.stack([np.full(len(begin), k), s[begin], lengths], axis=1))
            offsets.flush()
            del offsets
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return np.concatenate(spans).astype(np.int64) if spans else np.zeros((0, 3), np.int64)


def _loss_tokens(mask, n: int) -> int:
    return sum(int(np.count_nonzero(mask[a : min(n, a + COUNT_CHUNK)])) for a in range(0, n, COUNT_CHUNK))


def _build(fmt: str, config, tokenizer, shards: list[Shard], directory: Path, fp: str, listed: list[dict]) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    layout = _Layout(shards, _expected_eos(config, tokenizer), directory)
    held, counts, skips = layout.holdout(config.holdout_docs)
    holdout = np.zeros((len(held), 3), dtype=np.int64)
    for j, (k, i) in enumerate(held):
        starts, ends = layout.bounds(int(k))  # k is small: these reads are a few per held-out document's shard
        holdout[j] = (k, starts[i], ends[i])
    n_train = sum(counts) - skips.counts.get("empty", 0) - len(held)
    if n_train <= 0:
        raise DataError(f"{config.path}: source {config.name!r} has no training documents ({sum(counts)} "
                        f"documents, holdout_docs={config.holdout_docs})")
    spans = layout.write_training(held, n_train)
    _save_npy(directory / "spans.npy", spans)
    _save_npy(directory / "holdout.npy", holdout)
    offsets = np.load(directory / "offsets.npy", mmap_mode="r")
    meta = {
        "format_version": FORMAT_VERSION,
        "pretokenized": fmt,
        "name": config.name,
        "fingerprint": fp,
        "path": str(config.path),
        "files": listed,
        "n_docs": n_train,
        "n_tokens": int(offsets[-1]),
        "dtype": sorted({sh.tokens.dtype.name for sh in shards}),
        "vocab_size": len(tokenizer),
        "eos_token_id": _expected_eos(config, tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "written_by": sorted({sh.tokenizer_name for sh in shards if sh.tokenizer_name}),
        "shards": [{"name": sh.name, "n_docs": n, "n_tokens": len(sh.tokens)} for sh, n in zip(shards, counts)],
        "holdout": {"requested": config.holdout_docs, "n_docs": len(held),
                    "n_tokens": int((holdout[:, 2] - holdout[:, 1]).sum()), "duplicates": 0,
                    "documents": [[shards[int(k)].name, int(i)] for k, i in held]},
        "skips": skips.to_dict(),
        "has_mask": any(sh.mask is not None for sh in shards),
        "decontamination": None,
    }
    if meta["has_mask"]:  # one pass over the .loss files, the first time only
        mask = flat_view(_masks(shards), spans)
        meta["loss_tokens"] = _loss_tokens(mask, len(mask))
    write_json_atomic(directory / "meta.json", meta, indent=1)  # last: its presence marks the layout complete
    return meta


def _masks(shards: list[Shard]) -> list[np.ndarray]:
    return [sh.mask if sh.mask is not None else np.broadcast_to(np.uint8(1), (len(sh.tokens),)) for sh in shards]


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION else None


def open_pretokenized(config, tokenizer, *, cache_dir: Path | None = None) -> TokenizedSource:
    """A pre-tokenized source (`config`: a recipe `Source`) as a `TokenizedSource` over its files, in place.

    Raises DataError (one line, naming the file) for the problems `pretokenized_problems` reports; they are checked
    whenever the cached layout is missing or was made with another tokenizer."""
    fmt = detect_format(config)
    if fmt not in PRETOKENIZED:
        raise DataError(f"{config.path}: source {config.name!r} is not pre-tokenized (format {fmt})")
    if config.type != "text":
        raise DataError(f"{config.path}: {fmt} token files cannot be an instruction source (type: text)")
    root, files, shards = open_shards(fmt, config, _raw_dtype(config, tokenizer))
    fp, listed = _fingerprint(fmt, config, tokenizer, root, files)
    directory = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "pretok" / fp
    meta = _read_meta(directory)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if meta is None or meta.get("tokenizer_fingerprint") != tok_fp:
        problems = _problems(fmt, shards, config, tokenizer)
        if problems:
            raise DataError(f"source {config.name!r}: " + "; ".join(problems))
    cache_hit = meta is not None
    if meta is None:
        meta = _build(fmt, config, tokenizer, shards, directory, fp, listed)
    meta = {**meta, "name": config.name, "tokenizer_fingerprint": tok_fp, "vocab_size": len(tokenizer)}
    try:
        offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        spans = np.load(directory / "spans.npy")
        holdout = np.load(directory / "holdout.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"{directory}: unreadable layout cache ({e}); delete the directory to rebuild") from None
    arrays = [sh.tokens for sh in shards]
    h_spans = np.stack([holdout[:, 0], holdout[:, 1], holdout[:, 2] - holdout[:, 1]], axis=1)
    h_offsets = np.zeros(len(holdout) + 1, dtype=np.int64)
    np.cumsum(h_spans[:, 2], out=h_offsets[1:])
    mask = h_mask = None
    if meta["has_mask"]:
        masks = _masks(shards)
        mask, h_mask = flat_view(masks, spans), flat_view(masks, h_spans)
    if getattr(config, "decontaminate", False):
        log.debug("source %r is pre-tokenized: not decontaminated (no text to match)", config.name)
    return TokenizedSource(name=config.name, fingerprint=fp, directory=directory, tokens=flat_view(arrays, spans),
                           offsets=offsets, holdout_tokens=flat_view(arrays, h_spans), holdout_offsets=h_offsets,
                           skips=SkipReport.from_dict(meta["skips"]), meta=meta, cache_hit=cache_hit, mask=mask,
                           holdout_mask=h_mask)
