"""Fixtures for the data tests (sources are tokenized once per session: tokenizing is the slow part)."""

from __future__ import annotations

import pytest

from midtrain.data import TokenizedSource, byte_tokenizer, tokenize_source

from .corpus import prose_texts, random_texts, write_jsonl


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def sources(tmp_path_factory, tok) -> list[TokenizedSource]:
    """Three sources: prose (long-ish docs), synthetic (random lengths), tiny (few docs, forces epochs)."""
    root = tmp_path_factory.mktemp("corpora")
    cache = root / "cache"
    specs = [
        ("prose", prose_texts(300)),
        ("synthetic", random_texts(400, seed=1, hi=900)),
        ("tiny", random_texts(12, seed=2, lo=5, hi=60)),
    ]
    return [
        tokenize_source(name, write_jsonl(root / name / "data.jsonl", texts), "text", tok, holdout_docs=4,
                        cache_dir=cache)
        for name, texts in specs
    ]
