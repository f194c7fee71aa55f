"""Token losses with per-source sums, normalised by the global batch's label count.

Summing here and dividing by the global count (not averaging per micro-batch) makes the gradient independent of
how the global batch is split into ranks and micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor, n_sources: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sum of token losses, per-source loss sums [n_sources], per-source token counts [n_sources]).

    HF convention: logits at position t predict labels[t + 1].
    """
    # Shift the labels, not the logits: slicing [B, T, V] logits copies the largest tensor of the step.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shift_labels, ignore_index=IGNORE,
                             reduction="none")
    valid = shift_labels != IGNORE
    src = F.pad(source_ids[:, 1:], (0, 1), value=0).reshape(-1).clamp(min=0)
    detached = losses.detach() * valid
    per_source = torch.zeros(n_sources, dtype=torch.float32, device=logits.device).index_add_(0, src, detached)
    counts = torch.zeros(n_sources, dtype=torch.float32, device=logits.device).index_add_(0, src, valid.float())
    return losses.sum(), per_source, counts


def label_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
