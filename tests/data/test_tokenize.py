from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import midtrain.data.tokenize as tokenize_mod
from midtrain.data import DataError, token_dtype, tokenize_source
from midtrain.data.tokenize import TokenizedSource

from .corpus import random_texts, write_jsonl


def _decode_docs(tok, arrays) -> list[str]:
    out = []
    for a in arrays:
        assert a[0] == tok.bos_token_id and a[-1] == tok.eos_token_id
        assert tok.bos_token_id not in a[1:-1] and tok.eos_token_id not in a[1:-1]
        out.append(tok.decode(a[1:-1].tolist()))
    return out


def test_round_trip_layout_and_meta(tmp_path, tok):
    texts = random_texts(50, seed=3) + ["\u00fcnicode \U0001f600 doc"]
    src = tokenize_source("s", write_jsonl(tmp_path / "d.jsonl", texts), "text", tok, holdout_docs=5,
                          cache_dir=tmp_path / "cache")
    assert not src.cache_hit
    assert (src.n_docs, len(src.holdout_docs())) == (46, 5)
    assert src.tokens.dtype == np.uint16
    decoded = _decode_docs(tok, [src.doc(i) for i in range(src.n_docs)]) + _decode_docs(tok, src.holdout_docs())
    assert sorted(decoded) == sorted(texts)
    assert src.n_tokens == sum(len(t.encode()) + 2 for t in decoded[: src.n_docs])
    d = src.directory
    assert d == tmp_path / "cache" / "tok" / src.fingerprint
    assert sorted(p.name for p in d.iterdir()) == ["docs.npy", "holdout_docs.npy", "holdout_tokens.bin",
                                                  "meta.json", "tokens.bin"]
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["name"], meta["n_docs"], meta["n_tokens"], meta["dtype"]) == ("s", 46, src.n_tokens, "uint16")
    assert meta["holdout"]["n_docs"] == 5
    assert not [p for p in d.parent.iterdir() if ".tmp-" in p.name]  # no temporary leftovers


def test_cache_hit_does_not_retokenize(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", random_texts(30, seed=4))
    first = tokenize_source("s", path, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c")
    mtime = (first.directory / "tokens.bin").stat().st_mtime_ns

    def spy(*a, **k):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(tokenize_mod, "_encode", spy)
    second = tokenize_source("renamed", path, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c")
    assert second.cache_hit and second.fingerprint == first.fingerprint and second.name == "renamed"
    assert (second.directory / "tokens.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens) and np.array_equal(second.offsets, first.offsets)


def test_fingerprint_tracks_content_field_holdout_and_tokenizer(tmp_path, tok):
    from midtrain.data import train_bpe

    path = write_jsonl(tmp_path / "d.jsonl", random_texts(20, seed=5))
    base = tokenize_source("s", path, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c").fingerprint
    assert tokenize_source("s", path, "text", tok, holdout_docs=3, cache_dir=tmp_path / "c").fingerprint != base
    bpe = train_bpe(random_texts(50, seed=6), vocab_size=300)
    assert tokenize_source("s", path, "text", bpe, holdout_docs=2, cache_dir=tmp_path / "c").fingerprint != base
    write_jsonl(path, random_texts(20, seed=5)[:-1] + ["changed last document"])
    changed = tokenize_source("s", path, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c")
    assert changed.fingerprint != base and not changed.cache_hit
    assert len(list((tmp_path / "c" / "tok").iterdir())) == 4


def test_dtype_choice():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32  # uint16 would wrap ids >= 65536 (REFERENCE §7)
    assert token_dtype(151_936) == np.uint32


def test_holdout_is_smallest_hashes_independent_of_order_and_never_trained(tmp_path, tok):
    texts = random_texts(60, seed=7)
    by_hash = sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())
    expected_holdout = by_hash[:6]
    dup = expected_holdout[2]
    a = tmp_path / "a"
    write_jsonl(a / "1.jsonl", texts[:30] + [dup])  # an exact duplicate must not leak into training
    write_jsonl(a / "2.jsonl", texts[30:])
    b = tmp_path / "b"  # same documents, other files and order
    write_jsonl(b / "x.jsonl", texts[::-1][:10])
    write_jsonl(b / "y" / "z.jsonl", texts[::-1][10:])
    sa = tokenize_source("a", a, "text", tok, holdout_docs=6, cache_dir=tmp_path / "c")
    sb = tokenize_source("b", b, "text", tok, holdout_docs=6, cache_dir=tmp_path / "c")
    for s in (sa, sb):
        held = _decode_docs(tok, s.holdout_docs())
        assert held == expected_holdout  # sorted by hash
        train = _decode_docs(tok, [s.doc(i) for i in range(s.n_docs)])
        assert not set(held) & set(train)
        assert sorted(train) == sorted(by_hash[6:])
    assert sa.meta["holdout"]["duplicates"] == 1


def test_empty_source_after_skipping_names_path(tmp_path, tok):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": ""}\n{broken\n')
    with pytest.raises(DataError, match=rf"{f}.*no training documents.*empty=1.*invalid_json=1"):
        tokenize_source("s", f, "text", tok, holdout_docs=0, cache_dir=tmp_path / "c")
    g = write_jsonl(tmp_path / "few.jsonl", ["one", "two"])
    with pytest.raises(DataError, match="holdout_docs=2"):
        tokenize_source("s", g, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c" / "tok").iterdir()) == []  # failed builds leave nothing behind


def test_skips_are_recorded(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n{"text": 3}\n{"text": "also fine"}\n')
    s = tokenize_source("s", f, "text", tok, holdout_docs=0, cache_dir=tmp_path / "c")
    assert s.n_docs == 2 and s.skips.counts == {"not_string": 1}
    assert s.skips.examples == [f"{f}:2: not_string"]
    again = tokenize_source("s", f, "text", tok, holdout_docs=0, cache_dir=tmp_path / "c")
    assert again.cache_hit and again.skips.counts == {"not_string": 1}


def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, tok):
    """Read as it is, a resized cache file is an error naming it; through the pipeline (what runs use) the cache is
    verified first and the source tokenized again (issue 25's remedy)."""
    f = write_jsonl(tmp_path / "d.jsonl", ["hello world"])
    s = tokenize_source("s", f, "text", tok, holdout_docs=0, cache_dir=tmp_path / "c")
    with open(s.directory / "tokens.bin", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match="tokens.bin: size"):
        TokenizedSource.load("s", s.directory)
    rebuilt = tokenize_source("s", f, "text", tok, holdout_docs=0, cache_dir=tmp_path / "c")
    assert not rebuilt.cache_hit and rebuilt.doc(0).tolist() == s.doc(0).tolist()


def test_special_token_text_inside_a_document_stays_text(tmp_path, tok):
    text = "a chat log: <|eos|> and <|bos|> are just characters here"
    s = tokenize_source("s", write_jsonl(tmp_path / "d.jsonl", [text]), "text", tok, holdout_docs=0,
                        cache_dir=tmp_path / "c")
    doc = s.doc(0)
    assert doc.tolist() == [tok.bos_token_id, *text.encode(), tok.eos_token_id]  # specials only at the ends
    assert tok.backend_tokenizer.encode_special_tokens is False  # the caller's tokenizer is left as it was


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from midtrain.data import byte_tokenizer

    big = byte_tokenizer()
    big.add_tokens([f"<w{i}>" for i in range(65_536 - len(big) + 10)])  # ids beyond uint16
    top = len(big) - 1
    text = f"x <w{top - 259}> y"
    s = tokenize_source("s", write_jsonl(tmp_path / "d.jsonl", [text]), "text", big, holdout_docs=0,
                        cache_dir=tmp_path / "c")
    assert s.tokens.dtype == np.uint32 and s.meta["dtype"] == "uint32"
    assert top in s.doc(0).tolist() and big.decode(s.doc(0)[1:-1].tolist()) == text
