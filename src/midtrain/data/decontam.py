"""Benchmark decontamination by word n-gram overlap against local benchmark files (ours, not datatrove's).

datatrove's n-gram decontamination pulls benchmarks from the hub; this block reads them from disk (REFERENCE §7).

Normalisation (applied to benchmarks and documents alike): lowercase; a *word* is a maximal run of letters, digits
and underscores (`\\w+`), so punctuation and whitespace of any kind only separate words — reformatting whitespace,
case or punctuation spacing does not hide a benchmark item. A document is contaminated when at least `min_matches`
of its word n-grams (default n = 13, GPT-3 / lm-eval) occur in any benchmark item.

Benchmark files: jsonl (one item per line; the text fields named by `fields`, or the usual prompt/answer names,
are joined in order) or plain text (one item per blank-line-separated paragraph). The benchmark's name is the file
name without its suffixes. Modes: `drop` removes a contaminated document; `redact` cuts every matched span (merged)
out of the text, replacing it with `replacement`, and drops the document only if nothing is left.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from midtrain.data.errors import DataError

WORD = re.compile(r"\w+")
DEFAULT_FIELDS = ("prompt", "question", "input", "context", "text", "answer", "canonical_solution", "solution",
                  "output", "response", "completion", "target")
MAX_EXAMPLES = 5
Mode = Literal["drop", "redact"]


def words(text: str) -> list[str]:
    # Split first, then lowercase: str.lower() may change a text's length (e.g. "İ"), which would shift offsets.
    return [w.lower() for w in WORD.findall(text)]


def _word_spans(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    found = list(WORD.finditer(text))
    return [m.group().lower() for m in found], [m.span() for m in found]


def _bench_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return name


def load_benchmark_items(path: Path, fields: Sequence[str] | None = None) -> list[str]:
    """The items of one benchmark file as plain strings (see the module docstring for the formats)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read benchmark file ({e})") from None
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: invalid JSON in benchmark file") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: benchmark line is not a JSON object")
        names = list(fields) if fields else [f for f in DEFAULT_FIELDS if f in record]
        values = [record[f] for f in names if isinstance(record.get(f), str)]
        if not values:
            raise DataError(f"{path}:{lineno}: no text field among {', '.join(names or DEFAULT_FIELDS)}")
        items.append("\n".join(values))
    return items


@dataclass
class BenchmarkStats:
    name: str
    path: str
    items: int
    items_indexed: int  # items with at least n words (shorter ones cannot be matched by n-grams)
    ngrams_indexed: int
    documents_hit: int = 0
    ngrams_matched: int = 0  # matched n-gram occurrences in documents
    items_hit: set[int] = field(default_factory=set)
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "items": self.items, "items_indexed": self.items_indexed,
                "ngrams_indexed": self.ngrams_indexed, "documents_hit": self.documents_hit,
                "ngrams_matched": self.ngrams_matched, "items_hit": len(self.items_hit),
                "items_hit_ids": sorted(self.items_hit)[:1000], "examples": self.examples}


@dataclass
class Verdict:
    text: str | None  # what to keep (None: drop the document)
    hits: int  # matched n-gram occurrences
    benchmarks: list[str]


class Decontaminator:
    """Finds benchmark n-grams in documents; `check(text, location)` returns what to keep and updates the report."""

    def __init__(self, benchmarks: Sequence[Path | str], *, ngram: int = 13, mode: Mode = "drop",
                 min_matches: int = 1, fields: Sequence[str] | None = None, replacement: str = ""):
        if ngram < 1:
            raise ValueError(f"ngram={ngram} must be >= 1")
        if mode not in ("drop", "redact"):
            raise ValueError(f"mode={mode!r} must be 'drop' or 'redact'")
        if not benchmarks:
            raise ValueError("decontamination needs at least one benchmark file")
        self.n, self.mode, self.min_matches, self.replacement = ngram, mode, max(1, min_matches), replacement
        self.vocab: dict[str, int] = {}
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram of word ids -> (benchmark, item)
        self.stats: list[BenchmarkStats] = []
        self.documents = self.dropped = self.redacted = 0
        digest = hashlib.sha256(json.dumps([ngram, mode, self.min_matches, list(fields or []), replacement]).encode())
        for b, path in enumerate(benchmarks):
            path = Path(path)
            items = load_benchmark_items(path, fields)
            digest.update(json.dumps([_bench_name(path), items]).encode())
            indexed = 0
            for i, item in enumerate(items):
                ids = [self.vocab.setdefault(w, len(self.vocab)) for w in words(item)]
                indexed += len(ids) >= ngram
                for k in range(len(ids) - ngram + 1):
                    self.index.setdefault(tuple(ids[k : k + ngram]), (b, i))
            ngrams = sum(1 for v in self.index.values() if v[0] == b)
            self.stats.append(BenchmarkStats(_bench_name(path), str(path), len(items), indexed, ngrams))
        names = [s.name for s in self.stats]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique (got {names}); rename the files")
        self.fingerprint = digest.hexdigest()

    def matches(self, text: str) -> list[tuple[int, int, int, int]]:
        """(first word, last word + 1, benchmark, item) of every matched n-gram, in document order."""
        ws = words(text)
        return self._matches(ws)

    def _matches(self, ws: list[str]) -> list[tuple[int, int, int, int]]:
        n, vocab, index = self.n, self.vocab, self.index
        ids = [vocab.get(w, -1) for w in ws]
        found = []
        run = 0  # consecutive known words ending here: only such windows can be benchmark n-grams
        for end, t in enumerate(ids, 1):
            if t < 0:
                run = 0
                continue
            run += 1
            if run >= n:
                owner = index.get(tuple(ids[end - n : end]))
                if owner is not None:
                    found.append((end - n, end, *owner))
        return found

    def check(self, text: str, location: str = "") -> Verdict:
        self.documents += 1
        if self.mode == "redact":
            ws, spans = _word_spans(text)
        else:
            ws, spans = words(text), []
        found = self._matches(ws)
        if len(found) < self.min_matches:
            return Verdict(text, len(found), [])
        hit_benchmarks: dict[int, int] = {}
        for _, _, b, i in found:
            hit_benchmarks[b] = hit_benchmarks.get(b, 0) + 1
            self.stats[b].items_hit.add(i)
        for b, count in hit_benchmarks.items():
            st = self.stats[b]
            st.documents_hit += 1
            st.ngrams_matched += count
            if len(st.examples) < MAX_EXAMPLES:
                first = next(f for f in found if f[2] == b)
                st.examples.append({"location": location, "item": first[3], "ngrams": count,
                                    "match": " ".join(ws[first[0] : first[1]])})
        names = [self.stats[b].name for b in sorted(hit_benchmarks)]
        if self.mode == "drop":
            self.dropped += 1
            return Verdict(None, len(found), names)
        kept = self._redact(text, spans, found, self.replacement)
        if not WORD.search(self._redact(text, spans, found, "")):  # no words left besides benchmark text
            self.dropped += 1
            return Verdict(None, len(found), names)
        self.redacted += 1
        return Verdict(kept, len(found), names)

    @staticmethod
    def _redact(text: str, spans: list[tuple[int, int]], found: list[tuple[int, int, int, int]],
                replacement: str) -> str:
        merged: list[list[int]] = []  # character ranges, from the first matched word to the last, overlaps joined
        for lo, hi, _, _ in found:
            start, end = spans[lo][0], spans[hi - 1][1]
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        out, pos = [], 0
        for start, end in merged:
            out += [text[pos:start], replacement]
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def report(self) -> dict:
        return {
            "ngram": self.n, "mode": self.mode, "min_matches": self.min_matches, "fingerprint": self.fingerprint,
            "documents": self.documents, "dropped": self.dropped, "redacted": self.redacted,
            "benchmarks": [s.to_dict() for s in self.stats],
        }

    def reset_counts(self) -> None:
        """Start a new report (e.g. per source) with the same index."""
        self.documents = self.dropped = self.redacted = 0
        for s in self.stats:
            s.documents_hit = s.ngrams_matched = 0
            s.items_hit, s.examples = set(), []


# --------------------------------------------------------------------------- standalone: files in, files out


def _output_units(inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(unit, output path relative to OUT) for every data file / HF dataset dir under the inputs."""
    from midtrain.data.sources import list_units

    pairs, seen = [], {}
    for inp in inputs:
        inp = Path(inp)
        for unit in list_units(inp):
            unit = Path(unit)
            rel = Path(unit.name) if unit == inp else Path(inp.name) / unit.relative_to(inp)
            if rel in seen:
                raise DataError(f"{unit}: would be written to the same output as {seen[rel]}; pass distinct names")
            seen[rel] = unit
            pairs.append((unit, rel))
    return pairs


def decontaminate_paths(inputs: Sequence[Path], decon: Decontaminator, out: Path, text_field: str = "text") -> dict:
    """Write the kept (or redacted) documents of every input under `out`, in the input's format; return the report.

    jsonl/jsonl.gz keep every field of a record (only the text field changes under `redact`), parquet keeps its
    columns, a .txt file is written only if kept, an HF dataset dir is saved back as one. Unreadable records are
    not written and are counted under `skipped` with file:line examples.
    """
    from midtrain.data.sources import SkipReport, check_text, records_of_units
    from midtrain.io import write_json_atomic

    out = Path(out)
    skips = SkipReport()
    files = []
    for unit, rel in _output_units(inputs):
        kept: list[dict] = []
        n_in = 0
        for record, loc in records_of_units([unit], skips, None):
            if text_field not in record:
                skips.add("missing_field", loc)
                continue
            if check_text(record[text_field], loc, skips) is None:
                continue
            n_in += 1
            verdict = decon.check(record[text_field], loc)
            if verdict.text is not None:
                kept.append(record if verdict.text == record[text_field] else {**record, text_field: verdict.text})
        target = out / rel
        _write_like(unit, target, kept, text_field)
        files.append({"input": str(unit), "output": str(target) if kept or not unit.name.endswith(".txt") else None,
                      "documents": n_in, "kept": len(kept)})
    report = {**decon.report(), "files": files, "skipped": skips.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    return report


def _write_like(unit: Path, target: Path, records: list[dict], text_field: str) -> None:
    import os

    from midtrain.io import write_bytes_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    name = unit.name
    if unit.is_dir():  # saved HF dataset: save the kept rows back as one (empty datasets keep the columns)
        import datasets

        from midtrain.data.sources import is_hf_dataset_dir

        ds = datasets.load_from_disk(str(unit)) if is_hf_dataset_dir(unit) else None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        features = ds.features if ds is not None else None
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        datasets.Dataset.from_list(records, features=features).save_to_disk(str(tmp))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(unit)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)
        os.replace(tmp, target)
    elif name.endswith(".txt"):
        if records:
            write_bytes_atomic(target, records[0][text_field].encode("utf-8"))
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        write_bytes_atomic(target, gzip.compress(body, mtime=0) if name.endswith(".gz") else body)
