"""Perplexity at a length against a one-window-at-a-time loop with the model's own HF loss as the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from midtrain.eval.perplexity import length_windows, perplexity_at_length
from midtrain.model import build_model, preset_config


def test_windows_are_non_overlapping_in_document_order():
    docs = [np.arange(10), np.arange(100, 103), np.arange(200, 208)]
    w = length_windows(docs, 4, max_windows=10)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [200, 201, 202, 203], [204, 205, 206, 207]]
    assert len(length_windows(docs, 4, max_windows=3)) == 3
    with pytest.raises(ValueError, match="no document has 11 tokens .longest: 10."):
        length_windows(docs, 11, max_windows=3)


def test_matches_the_models_own_loss_window_by_window():
    model = build_model(preset_config("tiny-llama", vocab_size=50), seed=0)
    gen = np.random.default_rng(0)
    docs = [gen.integers(0, 50, n) for n in (70, 33, 130)]
    out = perplexity_at_length(model, docs, 32, batch_size=3)
    windows = length_windows(docs, 32, 100)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]  # HF mean over 31 targets
    assert out["windows"] == len(windows) == 2 + 1 + 4 and out["tokens"] == 7 * 31
    assert out["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))
    tail = perplexity_at_length(model, docs, 32, score_from=16)
    assert tail["tokens"] == 7 * 15 and tail["loss"] != out["loss"]
    assert model.training  # restored


def test_chunked_head_gives_the_same_perplexity(monkeypatch):
    """Large batches x vocabularies apply the head in row chunks (no [tokens, vocab] logits); same numbers."""
    from midtrain.eval import perplexity

    torch.manual_seed(0)
    model = build_model(preset_config("tiny-llama", vocab_size=512), seed=0)
    docs = [torch.randint(0, 512, (200,)).tolist() for _ in range(3)]
    full = perplexity_at_length(model, docs, 64, batch_size=4, score_from=8)
    from midtrain.model import loss

    calls = []
    real = loss.linear_cross_entropy
    monkeypatch.setattr(loss, "linear_cross_entropy", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(perplexity, "resolve_loss_chunk_tokens", lambda setting, model, tokens: 50)  # as if large
    chunked = perplexity_at_length(model, docs, 64, batch_size=4, score_from=8)
    assert calls and calls[0] == 50  # the chunked path ran
    assert chunked["tokens"] == full["tokens"]
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
