"""The loader's memory does not grow with the corpus: bytes allocated (tracemalloc, which numpy reports to) while a
warm pre-tokenized source is opened, a loader starts and 40 steps run, for corpora of 100k and 1M documents.

Before seeded bijections the loader held a permutation and a length per document (16 bytes each: 16 MB more at 1M
documents); memory-mapped files are not allocations, so only what the loader keeps per document would show."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from midtrain.config.recipe import Source
from midtrain.data import PackedLoader, byte_tokenizer
from midtrain.data.pretokenized import open_pretokenized


def _corpus(directory, n_docs: int, eos: int, seed: int):
    """A dolma-style raw token file of `n_docs` documents of 2..40 tokens, each ending with EOS."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 41, n_docs)
    tokens = rng.integers(3, 200, int(lengths.sum()), dtype=np.uint16)
    tokens[np.cumsum(lengths) - 1] = eos
    directory.mkdir(parents=True)
    tokens.tofile(directory / "part-00000.npy")
    return directory


def _allocated(source_dir, tok, cache, buckets) -> tuple[int, int]:
    """(peak bytes allocated by opening + start-up, peak over the 40 steps after it)."""
    cfg = Source(name="web", path=str(source_dir), holdout_docs=50)
    open_pretokenized(cfg, tok, cache_dir=cache)  # cold: builds the layout cache once
    tracemalloc.start()
    try:
        src = open_pretokenized(cfg, tok, cache_dir=cache)
        loader = PackedLoader([src], [1.0], seq_len=256, global_batch_seqs=8, seed=0,
                              length_buckets=[buckets])
        loader.next_step()
        start = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        for _ in range(40):
            loader.next_step()
        steps = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert src.cache_hit and src.n_docs > 0
    return start, steps


@pytest.mark.parametrize("buckets", [None, [(0, 16, 0.3), (16, None, 0.7)]], ids=["plain", "length-buckets"])
def test_loader_memory_is_flat_in_corpus_size(tmp_path, buckets):
    tok = byte_tokenizer()
    small = _allocated(_corpus(tmp_path / "small", 100_000, tok.eos_token_id, 0), tok, tmp_path / "cache", buckets)
    large = _allocated(_corpus(tmp_path / "large", 1_000_000, tok.eos_token_id, 1), tok, tmp_path / "cache",
                       buckets)
    for what, a, b in (("start-up", small[0], large[0]), ("steps", small[1], large[1])):
        assert b <= 1.2 * a + (64 << 10), f"{what}: {a:,} bytes at 100k documents, {b:,} at 1M"
