"""The batched, threaded tokenization pipeline writes exactly what a slow one-document-at-a-time encoder writes.

The reference below encodes each document alone through the `transformers` tokenizer call (not the backend's batch
API), and applies the held-out rule literally (keep the k smallest sha256 digests seen so far in a plain dict; a
document leaves the holdout, with its copies, when a smaller digest displaces it). Token shards, document index and
holdout must be byte-identical, for batches small enough that many encodes are in flight at once.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

import midtrain.data.tokenize as tokenize_mod
from midtrain.data import tokenize_source, train_bpe

from .corpus import prose_texts, random_texts


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


def _reference(texts: list[str], tok, k: int, dtype) -> dict[str, bytes]:
    held: dict[int, list] = {}  # digest -> [ids, copies]
    train: list[list[int]] = []
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"],
               tok.eos_token_id]
        d = _digest(text)
        if d in held:
            held[d][1] += 1
        elif len(held) < k:
            held[d] = [ids, 1]
        elif k and d < max(held):
            ids_out, copies = held.pop(max(held))
            train += [ids_out] * copies
            held[d] = [ids, 1]
        else:
            train.append(ids)
    holdout = [held[d][0] for d in sorted(held)]
    tok.backend_tokenizer.encode_special_tokens = False  # transformers leaves split_special_tokens switched on

    def npy(lengths: list[int]) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return buf.getvalue()

    flat = lambda docs: np.array([t for d in docs for t in d], dtype=dtype).tobytes()  # noqa: E731
    return {"tokens.bin": flat(train), "docs.npy": npy([len(d) for d in train]),
            "holdout_tokens.bin": flat(holdout), "holdout_docs.npy": npy([len(d) for d in holdout])}


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(prose_texts(200), 600)


@pytest.mark.parametrize("chunk_chars", [1500, 1 << 22])
def test_shards_equal_a_one_document_at_a_time_reference(tmp_path, bpe, monkeypatch, chunk_chars):
    texts = prose_texts(150) + random_texts(120, seed=7, hi=2000) + ["literal <|eos|> and <|bos|> in text",
                                                                     "\u00fcnicode \U0001f600 \u4e2d\u6587"]
    texts += texts[5:9] + [texts[0]] * 3  # exact duplicates, some of them of held-out documents
    bad = ['{"text": "ok but', '{"other": "x"}', '{"text": ""}', '[1, 2]', '{"text": 5}']
    lines = [json.dumps({"text": t}) for t in texts]
    for i, b in enumerate(bad):  # bad records spread through the file
        lines.insert(40 * i + 3, b)
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", chunk_chars)

    src = tokenize_source("s", path, "text", bpe, holdout_docs=7, cache_dir=tmp_path / "c")
    assert bpe.backend_tokenizer.encode_special_tokens is False  # the caller's tokenizer is left as it was

    want = _reference(texts, bpe, 7, np.uint16)
    for name, data in want.items():
        assert (src.directory / name).read_bytes() == data, name
    assert src.meta["holdout"]["duplicates"] >= 0 and src.n_docs + 7 + src.meta["holdout"]["duplicates"] == len(texts)
    # bad records: counted by reason, the first five reported with file:line (1-based physical lines)
    bad_lines = [i + 1 for i, line in enumerate(lines) if line in bad] + [len(lines) + 1]
    assert src.skips.counts == {"invalid_json": 1, "missing_field": 1, "empty": 1, "not_object": 1,
                                "not_string": 1, "non_utf8": 1}
    reasons = ["invalid_json", "missing_field", "empty", "not_object", "not_string"]
    assert src.skips.examples == [f"{path}:{n}: {r}" for n, r in zip(bad_lines, reasons)]


def test_records_only_the_stdlib_parses_keep_their_skip_reasons(tmp_path, bpe):
    """orjson reads lines first; what it rejects but json accepts is classified as before."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": NaN}\n{"text": "lone \\ud800"}\n{"text": "big", "n": 123456789012345678901234567890}\n'
                     b'\xef\xbb\xbf{"text": "bom"}\n{"text": "fine"}\n')
    src = tokenize_source("s", path, "text", bpe, holdout_docs=0, cache_dir=tmp_path / "c")
    assert src.n_docs == 2 and src.skips.counts == {"not_string": 1, "non_utf8": 1, "invalid_json": 1}
    assert src.skips.examples == [f"{path}:1: not_string", f"{path}:2: non_utf8", f"{path}:4: invalid_json"]


def test_encode_error_in_a_worker_leaves_no_cache(tmp_path, bpe, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(200, seed=3, hi=500)))
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 2000)
    calls = []

    def flaky(tokenizer, texts):
        calls.append(len(texts))
        if len(calls) == 4:
            raise RuntimeError("encoder crashed")
        return [[1] * len(t) for t in texts]

    monkeypatch.setattr(tokenize_mod, "_encode", flaky)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        tokenize_source("s", path, "text", bpe, holdout_docs=2, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c" / "tok").iterdir()) == []
    assert bpe.backend_tokenizer.encode_special_tokens is False
