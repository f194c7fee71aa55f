"""Data pipeline: read documents, tokenize into a cache, mix by tokens, pack into batches (CONTRACTS §2, §5).

Names load lazily so that `midtrain --help` (which imports `midtrain.cli.data`) pays for neither torch nor
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "midtrain.data.errors",
    "PackedLoader": "midtrain.data.loader",
    "DeficitSampler": "midtrain.data.mixture",
    "Document": "midtrain.data.sources",
    "SkipReport": "midtrain.data.sources",
    "iter_documents": "midtrain.data.sources",
    "iter_records": "midtrain.data.sources",
    "list_files": "midtrain.data.sources",
    "TokenView": "midtrain.data.pretokenized",
    "open_pretokenized": "midtrain.data.pretokenized",
    "pretokenized_problems": "midtrain.data.pretokenized",
    "TokenizedSource": "midtrain.data.tokenize",
    "default_cache_dir": "midtrain.data.tokenize",
    "source_fingerprint": "midtrain.data.tokenize",
    "token_dtype": "midtrain.data.tokenize",
    "tokenize_source": "midtrain.data.tokenize",
    "byte_tokenizer": "midtrain.data.tokenizer",
    "tokenizer_fingerprint": "midtrain.data.tokenizer",
    "train_bpe": "midtrain.data.tokenizer",
    "Decontaminator": "midtrain.data.decontam",
    "InstructionFormat": "midtrain.data.instruct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'midtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
