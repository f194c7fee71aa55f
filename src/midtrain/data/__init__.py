"""Data pipeline: read documents, tokenize into a cache, mix by tokens, pack into batches (CONTRACTS §2, §5)."""

from midtrain.data.errors import DataError
from midtrain.data.loader import PackedLoader
from midtrain.data.mixture import DeficitSampler
from midtrain.data.sources import Document, SkipReport, iter_documents, list_files
from midtrain.data.tokenize import (
    TokenizedSource,
    default_cache_dir,
    source_fingerprint,
    token_dtype,
    tokenize_source,
)
from midtrain.data.tokenizer import byte_tokenizer, tokenizer_fingerprint, train_bpe

__all__ = [
    "DataError",
    "DeficitSampler",
    "Document",
    "PackedLoader",
    "SkipReport",
    "TokenizedSource",
    "byte_tokenizer",
    "default_cache_dir",
    "iter_documents",
    "list_files",
    "source_fingerprint",
    "token_dtype",
    "tokenize_source",
    "tokenizer_fingerprint",
    "train_bpe",
]
