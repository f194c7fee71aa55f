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
import torch.nn.functional as F
from torch import nn

from midtrain.model.head import chunkable_head, hidden_states_only
from midtrain.train.linear_loss import linear_cross_entropy

# Above this many fp32 logits per batch (1 GiB) the head is applied a chunk of rows at a time: 4 windows of 32k
# tokens at a 128k vocabulary would be 64 GiB of logits, for a sum that needs none of them at once.
CHUNK_ABOVE_LOGITS = 1 << 28
CHUNK_TOKENS = 4096


def _loss_sum(model: nn.Module, ids: torch.Tensor, score_from: int) -> float:
    """Summed next-token loss of positions >= score_from of `ids` [B, T] (one document per row)."""
    targets = ids[:, score_from + 1 :]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
    head = None
    if ids.numel() * vocab > CHUNK_ABOVE_LOGITS:
        try:
            head = chunkable_head(model)
        except ValueError:  # softcapped, biased or sharded head: the full logits it is
            head = None
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, score_from:-1].float()
        return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
    with hidden_states_only(head):
        hidden = model(input_ids=ids, use_cache=False).logits[:, score_from:-1]
    total, _ = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets.reshape(-1),
                                    CHUNK_TOKENS)
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
