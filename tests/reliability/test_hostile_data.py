"""Hostile data (property-based): every record is a document or a counted, reported skip — never silently lost.

Files are built from known kinds of line, so the expected documents and skip reasons are known by construction
(the oracle does not re-implement the reader). Broken files (truncated gzip, parquet without the text column,
empty sources) are errors naming the file, never a traceback from deep inside and never a shorter dataset.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midtrain.data import DataError, byte_tokenizer, tokenize_source
from midtrain.data.sources import SkipReport, iter_documents

SETTINGS = settings(max_examples=40, deadline=10_000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60).filter(str.strip)

# (line bytes, expected text or None, skip reason or None) for each kind of record
LINE = st.one_of(
    TEXT.map(lambda t: (json.dumps({"text": t, "id": 1}).encode(), t, None)),
    TEXT.map(lambda t: (json.dumps({"text": t}, ensure_ascii=False).encode(), t, None)),
    st.just((b'{"text": "a", ', None, "invalid_json")),
    st.binary(min_size=1, max_size=20).map(lambda b: (b'{"text": "\xff\xfe' + b.replace(b"\n", b"") + b'"}',
                                                      None, "non_utf8")),
    st.just((b"[1, 2]", None, "not_object")),
    st.just((b'"just a string"', None, "not_object")),
    st.just((b'{"body": "wrong field"}', None, "missing_field")),
    st.sampled_from([b'{"text": 5}', b'{"text": null}', b'{"text": ["a"]}']).map(lambda b: (b, None, "not_string")),
    st.sampled_from([b'{"text": ""}', b'{"text": "   \\n\\t"}']).map(lambda b: (b, None, "empty")),
    st.just((b'{"text": "half \\ud800 surrogate"}', None, "non_utf8")),  # valid JSON, not encodable text
    st.just((b"   ", None, None)),  # a blank line is not a record
)


def _write(path: Path, lines: list[tuple[bytes, str | None, str | None]], gz: bool) -> Path:
    data = b"".join(line + b"\n" for line, _, _ in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@SETTINGS
@given(lines=st.lists(LINE, max_size=30), gz=st.booleans())
def test_every_record_is_a_document_or_a_counted_skip(tmp_path, lines, gz):
    path = _write(tmp_path / ("data.jsonl.gz" if gz else "data.jsonl"), lines, gz)
    skips = SkipReport()
    docs = list(iter_documents(path, "text", skips))
    assert [d.text for d in docs] == [t for _, t, _ in lines if t is not None]
    expected: dict[str, int] = {}
    for _, _, reason in lines:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert skips.counts == expected
    assert all(d.location.startswith(f"{path}:") for d in docs)


@SETTINGS
@given(lines=st.lists(LINE, min_size=1, max_size=30))
def test_tokenized_source_accounts_for_every_record(tmp_path, lines):
    """Tokenizing: documents + held out + skipped = records; or, with no document left, an error naming the file."""
    path = _write(tmp_path / "data.jsonl", lines, gz=False)
    n_docs = sum(t is not None for _, t, _ in lines)
    n_skipped = sum(r is not None for _, _, r in lines)
    try:
        source = tokenize_source("s", path, "text", byte_tokenizer(), holdout_docs=2, cache_dir=tmp_path / "c")
    except DataError as exc:
        distinct = {t for _, t, _ in lines if t is not None}  # copies of a held-out document are held out too
        assert len(distinct) <= 2 and str(path) in str(exc) and "no training documents" in str(exc)
        return
    held = source.meta["holdout"]
    assert source.n_docs + held["n_docs"] + held["duplicates"] == n_docs
    assert source.skips.total == n_skipped


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    whole = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(500)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read file"):
        list(iter_documents(path))
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:1: cannot read file"):
        list(iter_documents(path))


def test_non_utf8_text_file_is_a_counted_skip(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.txt").write_text("hello world")
    (tmp_path / "d" / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    skips = SkipReport()
    assert [d.text for d in iter_documents(tmp_path / "d", "text", skips)] == ["hello world"]
    assert skips.counts == {"non_utf8": 1} and "bad.txt" in skips.examples[0]


def test_giant_and_tiny_documents_survive_whole(tmp_path):
    giant = "word " * 1_000_000  # 5 MB on one line
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"text": giant}) + "\n" + json.dumps({"text": "x"}) + "\n")
    source = tokenize_source("g", path, "text", byte_tokenizer(), holdout_docs=0, cache_dir=tmp_path / "c")
    assert source.n_docs == 2 and sorted(len(source.doc(i)) for i in range(2)) == [3, len(giant) + 2]


def test_parquet_without_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        list(iter_documents(tmp_path / "p.parquet"))


@pytest.mark.parametrize("make", ["empty_file", "empty_dir", "only_blank", "only_hidden", "missing"])
def test_empty_sources_are_errors(tmp_path, make):
    path = tmp_path / "src"
    if make == "empty_file":
        path = tmp_path / "src.jsonl"
        path.write_bytes(b"")
    elif make == "empty_dir":
        path.mkdir()
    elif make == "only_blank":
        path = tmp_path / "src.jsonl"
        path.write_text("\n\n   \n")
    elif make == "only_hidden":
        path.mkdir()
        (path / ".hidden.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError) as info:
        tokenize_source("s", path, "text", byte_tokenizer(), holdout_docs=0, cache_dir=tmp_path / "c")
    assert str(path) in str(info.value)
