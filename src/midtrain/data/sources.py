"""Read raw documents from jsonl / jsonl.gz / parquet / txt files and saved Hugging Face `datasets` directories.

A source is a file or a directory (searched recursively, in sorted order, hidden entries ignored); a path with a
scheme (`s3://…`, `memory://…`) is read through fsspec (not HF dataset dirs). Each jsonl line or parquet/dataset row
is one document; a .txt file is one document. Bad records are counted in a `SkipReport` (with `file:line` or
`file:row N` examples) rather than aborting a multi-GB tokenization run for one broken record; unreadable files,
missing paths and a missing text column are errors naming the file.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from midtrain.data.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
HF_MARKERS = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk
MAX_EXAMPLES = 5
PARQUET_BATCH = 4096

PathLike = str | Path


@dataclass(frozen=True)
class Document:
    text: str
    location: str  # "file:line" (jsonl, txt) or "file:row N" (parquet, HF datasets; N is 1-based)
    record: dict | None = field(default=None, compare=False)  # the whole record, when asked for (metadata)


@dataclass
class SkipReport:
    """Counts of skipped records per reason, plus the first few `file:line` examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, location: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{location}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> SkipReport:
        return cls(counts=dict(d.get("counts", {})), examples=list(d.get("examples", [])))

    def __str__(self) -> str:
        if not self.total:
            return "no records skipped"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} records ({reasons}); e.g. " + "; ".join(self.examples)


# --------------------------------------------------------------------------- listing


def is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _fs(url: str):
    import fsspec  # a transformers dependency; imported lazily to keep the CLI fast

    return fsspec.core.url_to_fs(url)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def list_units(path: PathLike) -> list[PathLike]:
    """What a source reads, in order: data files and HF dataset dirs (remote: URLs of data files)."""
    if is_remote(path):
        fs, root = _fs(str(path))
        if not fs.exists(root):
            raise DataError(f"{path}: data path does not exist")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if fs.isfile(root):
            found = [root]
        else:
            found = sorted(p for p in fs.find(root) if p.endswith(SUFFIXES)
                           and not _hidden(tuple(p[len(root):].strip("/").split("/"))))
        if not found:
            raise DataError(f"{path}: holds no {', '.join(SUFFIXES)} files")
        bad = [p for p in found if not p.endswith(SUFFIXES)]
        if bad:
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        return [f"{protocol}://{p.removeprefix(protocol + '://')}" for p in found]
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)} "
                            "or a saved HF datasets dir)")
        return [path]
    if is_hf_dataset_dir(path):
        return [path]
    units: list[Path] = []
    for p in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
        rel = p.relative_to(path).parts
        if _hidden(rel) or any(u in p.parents for u in units):
            continue
        if is_hf_dataset_dir(p) or (p.is_file() and p.name.endswith(SUFFIXES)):
            units.append(p)
    if not units:
        raise DataError(f"{path}: directory holds no {', '.join(SUFFIXES)} files or saved HF datasets")
    return units


def list_files(path: PathLike) -> list[PathLike]:
    """Every file whose bytes determine the source (HF dataset dirs expanded), in a deterministic order."""
    files: list[PathLike] = []
    for unit in list_units(path):
        if isinstance(unit, Path) and unit.is_dir():
            files += sorted((p for p in unit.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
        else:
            files.append(unit)
    return files


def open_binary(file: PathLike) -> BinaryIO:
    """A local or fsspec file opened for reading bytes."""
    if is_remote(file):
        fs, p = _fs(str(file))
        return fs.open(p, "rb")
    return open(file, "rb")


# --------------------------------------------------------------------------- raw records per format


def _iter_jsonl(file: PathLike, skips: SkipReport, start: int = 0, first_line: int = 1,
                lines: int | None = None) -> Iterator[tuple[dict, str]]:
    lineno = first_line - 1
    try:
        with open_binary(file) as raw_f:
            f = gzip.GzipFile(fileobj=raw_f) if str(file).endswith(".gz") else raw_f
            if start:
                f.seek(start)
            for lineno, raw in enumerate(f if lines is None else islice(f, lines), first_line):
                if not raw.strip():
                    continue  # blank lines separate nothing and are not records
                loc = f"{file}:{lineno}"
                try:
                    record = orjson.loads(raw)  # ~3x json.loads; strict, so a failure is classified below
                except orjson.JSONDecodeError:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        skips.add("non_utf8", loc)
                        continue
                    try:  # what the stdlib accepts beyond orjson (NaN, lone surrogates, huge ints) stays readable
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        skips.add("invalid_json", loc)
                        continue
                if not isinstance(record, dict):
                    skips.add("not_object", loc)
                    continue
                yield record, loc
    except (OSError, EOFError, zlib.error) as e:  # unreadable or truncated/corrupt gzip
        raise DataError(f"{file}:{lineno + 1}: cannot read file ({e})") from None


def iter_jsonl_lines(file: PathLike, skips: SkipReport, *, start: int, first_line: int,
                     lines: int | None) -> Iterator[tuple[dict, str]]:
    """(record, location) of `lines` lines (None: to the end) of a plain .jsonl file from byte `start`, the start of
    line `first_line`: a contiguous part of the file, read exactly as reading the whole file reads it."""
    return _iter_jsonl(file, skips, start, first_line, lines)


def _iter_txt(file: PathLike, text_field: str, skips: SkipReport) -> Iterator[tuple[dict, str]]:
    loc = f"{file}:1"
    try:
        with open_binary(file) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{file}: cannot read file ({e})") from None
    try:
        yield {text_field: data.decode("utf-8")}, loc
    except UnicodeDecodeError:
        skips.add("non_utf8", loc)


def _check_columns(where: PathLike, available: list[str], columns: list[str] | None) -> None:
    missing = [c for c in columns or [] if c not in available]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (columns: {', '.join(available)})")


def _iter_parquet(file: PathLike, columns: list[str] | None) -> Iterator[tuple[dict, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        with open_binary(file) as f:
            pf = pq.ParquetFile(f)
            _check_columns(file, pf.schema_arrow.names, columns)
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
                for record in batch.to_pylist():
                    row += 1
                    yield record, f"{file}:row {row}"
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{file}:row {row + 1}: cannot read parquet ({e})") from None


def _iter_hf_dataset(directory: Path, columns: list[str] | None) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds: Any = datasets.load_from_disk(str(directory))
    except Exception as e:  # datasets raises many types for a broken dir; all mean "cannot read"
        raise DataError(f"{directory}: cannot load saved HF dataset ({e})") from None
    where = str(directory)
    if isinstance(ds, datasets.DatasetDict):  # train on the train split; other splits are someone's eval data
        if "train" not in ds:
            raise DataError(f"{directory}: dataset dict has no 'train' split (splits: {', '.join(ds)})")
        ds, where = ds["train"], f"{directory}[train]"
    _check_columns(where, ds.column_names, columns)
    if columns:
        ds = ds.select_columns(columns)
    row = 0
    for batch in ds.iter(batch_size=PARQUET_BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            row += 1
            yield dict(zip(keys, values)), f"{where}:row {row}"


def iter_records(path: PathLike, skips: SkipReport | None = None,
                 columns: list[str] | None = None) -> Iterator[tuple[dict, str]]:
    """(record, location) for every record under `path`; `columns` limits what columnar formats read.

    A .txt file yields `{columns[0] or "text": content}`. The path is checked eagerly.
    """
    units = list_units(path)
    report = skips if skips is not None else SkipReport()
    yield from records_of_units(units, report, columns)


def records_of_units(units: list[PathLike], skips: SkipReport, columns: list[str] | None) -> Iterator[tuple[dict, str]]:
    for unit in units:
        name = str(unit)
        if isinstance(unit, Path) and unit.is_dir():
            yield from _iter_hf_dataset(unit, columns)
        elif name.endswith(".parquet"):
            yield from _iter_parquet(unit, columns)
        elif name.endswith(".txt"):
            yield from _iter_txt(unit, (columns or ["text"])[0], skips)
        else:
            yield from _iter_jsonl(unit, skips)


def check_text(text: object, location: str, skips: SkipReport) -> str | None:
    if not isinstance(text, str):
        skips.add("not_string", location)
        return None
    if not text.strip():
        skips.add("empty", location)
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: no tokenizer can take it
            skips.add("non_utf8", location)
            return None
    return text


def iter_documents(path: PathLike, text_field: str = "text", skips: SkipReport | None = None, *,
                   keep_record: bool = False) -> Iterator[Document]:
    """Yield the documents under `path`; skipped records are counted into `skips` (when given).

    The path is checked eagerly (a missing path raises `DataError` at call time, not at first iteration).
    `keep_record` attaches the whole record (all metadata fields) to each document.
    """
    units = list_units(path)
    report = skips if skips is not None else SkipReport()
    records = records_of_units(units, report, None if keep_record else [text_field])
    return documents_of_records(records, text_field, report, keep_record=keep_record)


def documents_of_records(records: Iterator[tuple[dict, str]], text_field: str, skips: SkipReport, *,
                         keep_record: bool = False) -> Iterator[Document]:
    """The documents among (record, location) pairs; records without usable text are counted into `skips`."""
    for record, loc in records:
        if text_field not in record:
            skips.add("missing_field", loc)
            continue
        text = check_text(record[text_field], loc, skips)
        if text is not None:
            yield Document(text, loc, record if keep_record else None)


def long_documents(path: Path, tokenizer: Any, min_tokens: int, *, text_field: str = "text",
                   max_documents: int = 64) -> list[np.ndarray]:
    """Token ids of up to `max_documents` documents of at least `min_tokens` tokens (in file order).

    Raises DataError for unreadable input and when no document is long enough (e.g. for LongRoPE's search, which
    scores windows of exactly `min_tokens` tokens).
    """
    docs, longest, seen = [], 0, 0
    for doc in iter_documents(Path(path), text_field):
        seen += 1
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            docs.append(np.asarray(ids, dtype=np.int64))
            if len(docs) == max_documents:
                break
    if not docs:
        raise DataError(
            f"{path}: no document has {min_tokens} tokens (read {seen} documents, longest {longest} tokens); "
            "LongRoPE's search scores windows of exactly --target-length tokens"
        )
    return docs
