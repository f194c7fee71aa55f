"""Token files other tools wrote, opened by memory map: what a pre-tokenized source is made of.

Formats (docs/DATA.md "Pre-tokenized corpora"): datatrove `DocumentTokenizer` output (`*.ds` + `*.ds.index` [+
`*.ds.loss`, `*.ds.metadata`]), Megatron indexed datasets (`*.bin` + `*.idx`, MMIDIDX version 1), dolma/OLMo numpy
token files (`.npy` with or without a numpy header, raw `.bin`; documents end at the EOS id) and saved HF datasets
with an `input_ids` column. Each file (or HF arrow chunk) is a `Shard`: its tokens are mapped at once, its document
bounds only when asked (`Shard.bounds()`), so a source whose layout is cached never reads an index again.
"""

from __future__ import annotations

import glob
import json
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midtrain.data.errors import DataError
from midtrain.data.sources import SUFFIXES, is_hf_dataset_dir, is_remote

PRETOKENIZED = ("datatrove", "megatron", "numpy", "hf_dataset")
SAMPLE_TOKENS = 1 << 20  # prefix of each shard whose ids are checked against the vocabulary
SAMPLE_DOCS = 1024  # documents per shard whose last token is compared with the EOS id
SCAN_CHUNK = 1 << 24  # tokens per step when scanning numpy files for EOS
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}  # megatron-core's DType codes
NPY_MAGIC = b"\x93NUMPY"
GLOB_CHARS = re.compile(r"[*?[]")

Bounds = tuple[np.ndarray, np.ndarray]  # int64 (starts, ends) of a shard's documents in its token array


@dataclass
class Shard:
    """One memory-mapped token array; its documents are [start, end) spans of it."""

    name: str  # relative to the source root: reports, the held-out hash, the cached layout
    file: Path  # the token file (errors name it)
    tokens: np.ndarray
    read_bounds: Callable[[], Bounds] | None = None  # None: documents end at the EOS id (numpy files)
    mask: np.ndarray | None = None  # datatrove .ds.loss: 1 = carries loss
    tokenizer_name: str | None = None  # datatrove .ds.metadata

    @property
    def split_by_eos(self) -> bool:
        return self.read_bounds is None

    def bounds(self) -> Bounds:
        if self.read_bounds is None:
            raise ValueError(f"{self.file}: documents are found by scanning for EOS (eos_ends)")
        return self.read_bounds()


def memmap(path: Path, dtype, offset: int = 0, count: int | None = None, *, random: bool = False) -> np.ndarray:
    """`count` items of `dtype` from byte `offset` of `path` (all that follow when None), read-only, as a plain
    ndarray over the map (slicing the memmap subclass costs more than the copy). `random`: documents are read in
    shuffled order, so the kernel is told not to read ahead (its readahead would page in megabytes around every
    document of a few kilobytes: I/O on a shared filesystem, resident pages in every rank)."""
    dtype = np.dtype(dtype)
    size = path.stat().st_size - offset
    if size % dtype.itemsize and count is None:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (wrong dtype?)")
    n = size // dtype.itemsize if count is None else count
    if n == 0:
        return np.zeros(0, dtype)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if random and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=n, offset=offset)


def spans_from_ends(ends: np.ndarray) -> Bounds:
    ends = np.asarray(ends, dtype=np.int64)
    starts = np.zeros(len(ends), dtype=np.int64)
    starts[1:] = ends[:-1]
    return starts, ends


def eos_ends(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Document ends (exclusive) of a flat token array whose documents end with `eos`; trailing tokens after the
    last EOS are one more document. Scanned in chunks (memory independent of the file size)."""
    parts = [np.flatnonzero(tokens[i : i + SCAN_CHUNK] == eos) + (i + 1) for i in range(0, len(tokens), SCAN_CHUNK)]
    ends = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    return ends


# --------------------------------------------------------------------------- one reader per format


def datatrove_shard(ds: Path, root: Path, default_dtype: np.dtype) -> Shard:
    index, loss, meta = (ds.with_name(ds.name + s) for s in (".index", ".loss", ".metadata"))
    tokenizer_name, token_size = None, None
    if meta.is_file():
        first = meta.read_text().splitlines()[:1]
        if first and "|" in first[0]:
            tokenizer_name, _, size = first[0].rpartition("|")
            token_size = int(size) if size.isdigit() else None
    has_index = index.is_file()
    if token_size is None:  # older datatrove: infer from the last document end (one read of 8 bytes)
        last = memmap(index, np.uint64)[-1:] if has_index else []
        token_size = ds.stat().st_size // int(last[0]) if len(last) and last[0] > 0 else default_dtype.itemsize
    if token_size not in (2, 4):
        raise DataError(f"{ds}: token size {token_size} bytes (datatrove writes 2 or 4)")
    tokens = memmap(ds, np.uint16 if token_size == 2 else np.uint32, random=True)
    mask = None
    if loss.is_file():
        mask = memmap(loss, np.uint8)
        if len(mask) != len(tokens):
            raise DataError(f"{loss}: {len(mask)} loss flags for {len(tokens)} tokens")

    def bounds() -> Bounds:
        ends = memmap(index, np.uint64).astype(np.int64)
        if len(ends) and int(ends[-1]) != len(tokens):
            raise DataError(f"{index}: the last document ends at token {int(ends[-1])}, but {ds.name} holds "
                            f"{len(tokens)} tokens of {token_size} bytes")
        return spans_from_ends(ends)

    return Shard(relative_name(ds, root), ds, tokens, bounds if has_index else None, mask, tokenizer_name)


def megatron_shard(prefix: Path, root: Path) -> Shard:
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    if not bin_.is_file():
        raise DataError(f"{idx}: no {bin_.name} beside it")
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != MEGATRON_MAGIC:
        raise DataError(f"{idx}: not a Megatron index (no MMIDIDX header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{idx}: Megatron index version {version} (only 1 is known)")
    if code not in MEGATRON_DTYPES or np.dtype(MEGATRON_DTYPES[code]).kind not in "ui":
        raise DataError(f"{idx}: dtype code {code} is not an integer token type")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    if idx.stat().st_size < 34 + n_seq * 12 + n_doc * 8:
        raise DataError(f"{idx}: truncated ({idx.stat().st_size} bytes for {n_seq} sequences, {n_doc} documents)")
    tokens = memmap(bin_, dtype, random=True)

    def bounds() -> Bounds:
        lengths = memmap(idx, np.int32, 34, n_seq).astype(np.int64)
        pointers = memmap(idx, np.int64, 34 + n_seq * 4, n_seq)
        doc_idx = memmap(idx, np.int64, 34 + n_seq * 12, n_doc)
        if n_seq and np.any(pointers[1:] != pointers[:-1] + lengths[:-1] * dtype.itemsize):
            raise DataError(f"{idx}: sequences are not stored back to back in {bin_.name} (not supported)")
        seq_start = pointers // dtype.itemsize
        if n_seq and int(seq_start[-1] + lengths[-1]) > len(tokens):
            raise DataError(f"{idx}: sequences run past the end of {bin_.name} ({len(tokens)} tokens)")
        if not n_doc or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
            raise DataError(f"{idx}: document indices do not partition its {n_seq} sequences")
        # document i = sequences doc_idx[i] .. doc_idx[i+1]-1, contiguous: its span starts where its first one does
        seq_bounds = np.append(seq_start, seq_start[-1] + lengths[-1] if n_seq else 0)
        return seq_bounds[doc_idx[:-1]], seq_bounds[doc_idx[1:]]

    return Shard(relative_name(bin_, root), bin_, tokens, bounds)


def numpy_shard(file: Path, root: Path, dtype: np.dtype) -> Shard:
    with open(file, "rb") as f:
        magic = f.read(6)
    if magic == NPY_MAGIC:
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, _, header_dtype = _npy_header(f, version)
                start = f.tell()
        except ValueError as e:
            raise DataError(f"{file}: unreadable .npy ({e})") from None
        if len(shape) != 1 or header_dtype.kind not in "ui":
            raise DataError(f"{file}: expected a 1-D integer token array, got {len(shape)}-D {header_dtype}")
        tokens = memmap(file, header_dtype, start, shape[0], random=True)
    else:  # dolma/OLMo write raw memmaps (no header), whatever the suffix
        tokens = memmap(file, dtype, random=True)
    return Shard(relative_name(file, root), file, tokens)


def _npy_header(f, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"npy format version {version}")


def hf_shards(path: Path) -> list[Shard]:
    """One shard per arrow chunk of the `input_ids` column (memory-mapped by `datasets`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DataError(f"{path}: cannot load the saved HF dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    if "input_ids" not in ds.column_names:
        raise DataError(f"{path}: no column 'input_ids' (columns: {', '.join(ds.column_names)})")
    if getattr(ds, "_indices", None) is not None:
        raise DataError(f"{path}: the dataset has an indices mapping; save it with flatten_indices() first")
    shards = []
    for j, chunk in enumerate(ds.data.table.column("input_ids").chunks):
        try:
            values = chunk.values.to_numpy(zero_copy_only=True)
        except Exception as e:  # noqa: BLE001 - pyarrow: nulls inside lists, non-integer values
            raise DataError(f"{path}: input_ids cannot be memory-mapped ({e})") from None
        if values.dtype.kind not in "ui":
            raise DataError(f"{path}: input_ids hold {values.dtype}, not integer token ids")

        def bounds(chunk=chunk) -> Bounds:
            offsets = chunk.offsets.to_numpy().astype(np.int64)
            starts, ends = offsets[:-1].copy(), offsets[1:].copy()
            if chunk.null_count:
                null = chunk.is_null().to_numpy(zero_copy_only=False)
                ends[null] = starts[null]
            return starts, ends

        shards.append(Shard(f"{path.name}#{j}", path, values, bounds))
    return shards


def relative_name(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.name


# --------------------------------------------------------------------------- listing and detection


def is_glob(path) -> bool:
    return isinstance(path, Path | str) and not is_remote(path) and bool(GLOB_CHARS.search(str(path))) \
        and not Path(path).exists()


def list_files(path) -> tuple[Path, list[Path]]:
    """(root the names are relative to, files sorted by name): a glob, a directory (recursive, hidden entries
    skipped) or one file."""
    if is_glob(path):
        files = sorted((Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()),
                       key=lambda p: p.as_posix())
        root = Path(str(path)[: GLOB_CHARS.search(str(path)).start()])
        return (root if str(root).endswith("/") or root.is_dir() else root.parent), files
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)]
        return p, sorted(files, key=lambda f: f.relative_to(p).as_posix())
    return p.parent, [p] if p.is_file() else []


def format_units(fmt: str, files: list[Path]) -> list[Path]:
    """The files (Megatron: the path prefixes) that are one shard each in `fmt`."""
    names = {f.name for f in files}
    if fmt == "datatrove":
        return [f for f in files if f.name.endswith(".ds")]
    if fmt == "megatron":
        seen, out = set(), []
        for f in files:
            if f.suffix in (".bin", ".idx") and (f.with_suffix(".idx").name in names or f.suffix == ".idx"):
                prefix = f.with_suffix("")
                if prefix not in seen:
                    seen.add(prefix)
                    out.append(prefix)
        return out
    if fmt == "numpy":
        return [f for f in files if f.suffix == ".npy" or (f.suffix == ".bin" and f.with_suffix(".idx").name
                                                               not in names)]
    return []


def _hf_columns(path: Path) -> list[str]:
    for info in [path / "dataset_info.json", *sorted(path.glob("*/dataset_info.json"))]:
        try:
            return list(json.loads(info.read_text()).get("features") or {})
        except (OSError, ValueError, AttributeError):
            continue
    return []


def detect_format(config) -> str:
    """The format a source (a recipe `Source`) is read as: its `format`, or (auto) what its files are. Cheap: a
    listing and, for saved HF datasets, their feature names. A path that does not exist is `text` (the text reader
    names it)."""
    declared = getattr(config, "format", "auto")
    if declared != "auto" or getattr(config, "type", "text") != "text":
        return "text" if declared == "auto" else declared
    path = config.path
    if is_remote(path):
        return "text"
    if not is_glob(path) and is_hf_dataset_dir(Path(path)):
        columns = _hf_columns(Path(path))
        return "hf_dataset" if "input_ids" in columns and config.text_field not in columns else "text"
    _, files = list_files(path)
    found = [fmt for fmt in ("datatrove", "megatron", "numpy") if format_units(fmt, files)]
    if not found:
        return "text"
    texts = [f for f in files if f.name.endswith(SUFFIXES)]
    if texts or len(found) > 1:
        what = found + (["text"] if texts else [])
        raise DataError(f"{path}: holds files of several formats ({', '.join(what)}); give each its own source, or "
                        "set the source's `format`")
    return found[0]


def is_pretokenized(config) -> bool:
    return detect_format(config) in PRETOKENIZED


def open_shards(fmt: str, config, raw_dtype: np.dtype) -> tuple[Path, list[Path], list[Shard]]:
    """(root, every file the source's bytes come from, its shards with tokens mapped and bounds not yet read)."""
    root, files = list_files(config.path)
    if fmt == "hf_dataset":
        path = Path(config.path)
        if not is_hf_dataset_dir(path):
            raise DataError(f"{path}: not a saved HF dataset directory (no state.json / dataset_dict.json)")
        return path, files, hf_shards(path)
    units = format_units(fmt, files)
    if not units:
        want = {"datatrove": "*.ds", "megatron": "*.bin + *.idx", "numpy": "*.npy / *.bin"}[fmt]
        raise DataError(f"{config.path}: holds no {fmt} token files ({want})")
    if fmt == "datatrove":
        shards = [datatrove_shard(u, root, raw_dtype) for u in units]
        used = {u.with_name(u.name + s) for u in units for s in ("", ".index", ".loss", ".metadata")}
    elif fmt == "megatron":
        shards = [megatron_shard(u, root) for u in units]
        used = {u.with_name(u.name + s) for u in units for s in (".bin", ".idx")}
    else:
        shards = [numpy_shard(u, root, raw_dtype) for u in units]
        used = set(units)
    return root, [f for f in files if f in used], shards


# --------------------------------------------------------------------------- does it fit the tokenizer


def shard_problems(fmt: str, shards: list[Shard], path, *, vocab: int, eos: int | None,
                   explicit_eos: bool) -> list[str]:
    """One line per problem, naming the file: a token dtype too small for the vocabulary, an id outside it (in the
    first 1M and last 64K tokens of each shard), documents that end (>= 90% of the first 1,024) with an id other than
    the EOS, an EOS-split file without the EOS in its first 1M tokens, shards of different tokenizers."""
    problems = []
    for sh in shards:
        dt = sh.tokens.dtype
        if dt.kind in "ui" and np.iinfo(dt).max < vocab - 1:
            problems.append(f"{sh.file}: {dt.name} tokens cannot hold the tokenizer's {vocab:,} ids (a file "
                            "written for another tokenizer?)")
            continue
        head = np.asarray(sh.tokens[:SAMPLE_TOKENS])
        tail = np.asarray(sh.tokens[max(len(sh.tokens) - SAMPLE_TOKENS // 16, len(head)):])
        sample = np.concatenate([head, tail]) if len(tail) else head
        if len(sample):
            hi, lo = int(sample.max()), int(sample.min())
            if hi >= vocab or lo < 0:
                bad = hi if hi >= vocab else lo
                problems.append(f"{sh.file}: token id {bad} is outside the tokenizer's {vocab:,} ids (a file "
                                "written for another tokenizer?)")
                continue
        if eos is None:
            continue
        if sh.split_by_eos:
            if len(head) >= 4096 and not np.any(head == eos):
                problems.append(f"{sh.file}: no EOS id {eos} in its first {len(head):,} tokens, so documents cannot "
                                "be found (another tokenizer? set the source's eos_token_id)")
            continue
        starts, ends = sh.bounds()
        ends, starts = ends[:SAMPLE_DOCS], starts[:SAMPLE_DOCS]
        last = sh.tokens[ends[ends > starts] - 1]  # fancy indexing reads only those pages of the map
        if len(last) >= 8:
            ids, counts = np.unique(last, return_counts=True)
            top = int(ids[np.argmax(counts)])
            if counts.max() >= 0.9 * len(last) and top != eos:
                whose = "the source's eos_token_id" if explicit_eos else "the tokenizer's eos_token_id"
                problems.append(f"{sh.file}: documents end with token id {top}, but {whose} is {eos} (a file "
                                "written for another tokenizer?)")
    if fmt == "datatrove":
        names = {sh.tokenizer_name for sh in shards if sh.tokenizer_name}
        if len(names) > 1:
            problems.append(f"{path}: shards were written by different tokenizers ({', '.join(sorted(names))})")
    return problems
