"""Read raw documents from jsonl / jsonl.gz / txt files.

A source is a file or a directory (searched recursively, in sorted order, hidden entries ignored). Each jsonl line is
one document; a .txt file is one document. Bad jsonl lines are counted in a `SkipReport` rather than aborting a
multi-GB tokenization run for one broken record; unreadable files and missing paths are errors.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from midtrain.data.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Document:
    text: str
    location: str  # "file:line"


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


def _is_data_file(p: Path) -> bool:
    return p.is_file() and p.name.endswith(SUFFIXES) and not p.name.startswith(".")


def list_files(path: Path) -> list[Path]:
    """The data files of a source, in a deterministic order (sorted by path relative to the source)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if _is_data_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise DataError(f"{path}: directory holds no {', '.join(SUFFIXES)} files")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _check_text(text: object, location: str, skips: SkipReport) -> str | None:
    if not isinstance(text, str):
        skips.add("not_string", location)
        return None
    if not text.strip():
        skips.add("empty", location)
        return None
    return text


def _iter_jsonl(file: Path, text_field: str, skips: SkipReport) -> Iterator[Document]:
    opener = gzip.open if file.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # blank lines separate nothing and are not records
                loc = f"{file}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skips.add("non_utf8", loc)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skips.add("invalid_json", loc)
                    continue
                if not isinstance(record, dict):
                    skips.add("not_object", loc)
                    continue
                if text_field not in record:
                    skips.add("missing_field", loc)
                    continue
                text = _check_text(record[text_field], loc, skips)
                if text is not None:
                    yield Document(text, loc)
    except (OSError, EOFError, zlib.error) as e:  # unreadable or truncated/corrupt gzip
        raise DataError(f"{file}:{lineno + 1}: cannot read file ({e})") from None


def _iter_txt(file: Path, skips: SkipReport) -> Iterator[Document]:
    loc = f"{file}:1"
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read file ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("non_utf8", loc)
        return
    text = _check_text(text, loc, skips)
    if text is not None:
        yield Document(text, loc)


def iter_documents(path: Path, text_field: str = "text", skips: SkipReport | None = None) -> Iterator[Document]:
    """Yield the documents under `path`; skipped records are counted into `skips` (when given).

    The path is checked eagerly (a missing path raises `DataError` at call time, not at first iteration).
    """
    files = list_files(Path(path))
    report = skips if skips is not None else SkipReport()

    def gen() -> Iterator[Document]:
        for file in files:
            if file.name.endswith(".txt"):
                yield from _iter_txt(file, report)
            else:
                yield from _iter_jsonl(file, text_field, report)

    return gen()
