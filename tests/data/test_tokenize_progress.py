"""A long tokenization says how far it is: counts of what is written so far, growing, never past the total."""

from __future__ import annotations

import json

from midtrain.data import byte_tokenizer
from midtrain.data import tokenize as tokenize_module
from midtrain.data.decontam import Decontaminator
from midtrain.data.tokenize import tokenize_source


def test_progress_reports_growing_counts_while_tokenizing(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_module, "PROGRESS_SECONDS", 0.0)  # every batch
    monkeypatch.setattr(tokenize_module, "CHUNK_CHARS", 2_000)  # many batches from a small file
    docs = [f"document {i} " + "word " * (20 + i % 30) for i in range(300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "nothing here overlaps the training text at all, truly"}) + "\n")
    calls: list[tuple[int, int]] = []
    source = tokenize_source("docs", path, "text", byte_tokenizer(), holdout_docs=4, cache_dir=tmp_path / "cache",
                             decontaminator=Decontaminator([bench], ngram=8), progress=lambda d, t: calls.append((d, t)))
    assert len(calls) > 3
    assert calls == sorted(calls) and calls[0][0] > 0
    assert calls[-1][0] <= source.n_docs and calls[-1][1] <= source.n_tokens  # training documents written
    # a cache hit reports nothing: there is nothing to wait for
    again: list[tuple[int, int]] = []
    tokenize_source("docs", path, "text", byte_tokenizer(), holdout_docs=4, cache_dir=tmp_path / "cache",
                    decontaminator=Decontaminator([bench], ngram=8), progress=lambda d, t: again.append((d, t)))
    assert again == []
