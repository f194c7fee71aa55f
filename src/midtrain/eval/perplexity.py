"""Perplexity as a function of context length: the first thing a context extension must not break.

Each long document is cut into non-overlapping windows of exactly `length` tokens, each window is scored on its
own (positions 0 .. length-1, one document per row, plain causal attention), and the loss is averaged over every
predicted token. Optionally only the tail of each window is scored (`score_from`), which isolates the positions a
short-context model has never seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from midtrain.model.attention import forward_packed
from midtrain.model.head import resolve_loss_chunk_tokens
from midtrain.model.loss import IGNORE, token_loss_sums


def _loss_sum(model: nn.Module, ids: torch.Tensor, score_from: int) -> float:
    """Summed next-token loss of positions >= score_from of `ids` [B, T] (one document per row). Large batches x
    vocabularies apply the head a chunk of rows at a time (`loss_chunk_tokens: auto`): 4 windows of 32k tokens at a
    128k vocabulary would otherwise be 64 GiB of fp32 logits."""
    length = ids.shape[1]
    positions = torch.arange(length, device=ids.device).expand_as(ids)
    labels = ids.masked_fill(positions <= score_from, IGNORE)  # position t predicts t + 1: targets from score_from + 1
    chunk = resolve_loss_chunk_tokens("auto", model, ids.numel())
    out = forward_packed(model, {"input_ids": ids, "position_ids": positions}, loss_chunk_tokens=chunk)
    total, _, _ = token_loss_sums(out, labels, torch.zeros_like(ids), 1)
    return float(total)


def length_windows(documents: Sequence[Sequence[int] | np.ndarray], length: int, max_windows: int) -> torch.Tensor:
    """[N, length] windows, taken document by document in order (deterministic), at most `max_windows`."""
    if length < 2:
        raise ValueError(f"length must be >= 2 (got {length})")
    windows: list[np.ndarray] = []
    for doc in documents:
        doc = np.asarray(doc, dtype=np.int64)
        for start in range(0, len(doc) - length + 1, length):
            windows.append(doc[start : start + length])
            if len(windows) == max_windows:
                return torch.from_numpy(np.stack(windows))
    if not windows:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(
            f"no document has {length} tokens (longest: {longest}); give longer documents or a shorter length"
        )
    return torch.from_numpy(np.stack(windows))


@torch.no_grad()
def perplexity_at_length(
    model: nn.Module,
    documents: Sequence[Sequence[int] | np.ndarray],
    length: int,
    *,
    max_windows: int = 32,
    batch_size: int = 4,
    score_from: int = 0,
) -> dict[str, float]:
    """{"loss", "ppl", "windows", "tokens"} over windows of `length` tokens; positions < score_from are context only."""
    if not 0 <= score_from < length - 1:
        raise ValueError(f"score_from must be in [0, length - 1) (got {score_from} for length {length})")
    windows = length_windows(documents, length, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size].to(device)
            total += _loss_sum(model, ids, score_from)
            count += ids[:, score_from + 1 :].numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "windows": len(windows), "tokens": count}
