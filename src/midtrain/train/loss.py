"""Token losses with per-source sums, normalised by the global batch's label count.

Summing here and dividing by the global count (not averaging per micro-batch) makes the gradient independent of
how the global batch is split into ranks and micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    source_ids: torch.Tensor,
    n_sources: int,
    *,
    reuse_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sum of token losses, per-source loss sums [n_sources], per-source token counts [n_sources]).

    HF convention: logits at position t predict labels[t + 1]. With `reuse_logits` (the trainer's choice) and a
    logits tensor that requires grad, the backward pass writes the logits' gradient into the logits' own storage
    (`inplace_cross_entropy`): the caller must not read `logits` after `backward()`.
    """
    # Shift the labels, not the logits: slicing [B, T, V] logits copies the largest tensor of the step.
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    flat = logits.reshape(-1, logits.size(-1))
    # Only a tensor the forward made for us (not a leaf, not a view of another tensor) may be overwritten.
    if reuse_logits and torch.is_grad_enabled() and logits.grad_fn is not None and not logits._is_view():
        losses = inplace_cross_entropy(flat, shift_labels)
    else:
        losses = F.cross_entropy(flat.float(), shift_labels, ignore_index=IGNORE, reduction="none")
    valid = shift_labels != IGNORE
    src = F.pad(source_ids[:, 1:], (0, 1), value=0).reshape(-1).clamp(min=0)
    detached = losses.detach() * valid
    per_source = torch.zeros(n_sources, dtype=torch.float32, device=logits.device).index_add_(0, src, detached)
    counts = torch.zeros(n_sources, dtype=torch.float32, device=logits.device).index_add_(0, src, valid.float())
    return losses.sum(), per_source, counts


def label_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


# Rows per chunk of the fused cross-entropy: [256, V] fp32 temporaries (8 MB at V=8192) stay in cache and under
# glibc's mmap threshold, so no chunk is page-faulted in afresh.
_CE_CHUNK_ROWS = 256


class _InplaceCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy whose backward writes softmax - onehot into the logits' own storage.

    `F.cross_entropy` on [N, V] logits materialises log_softmax [N, V] in forward, then a zero-filled one-hot
    gradient and a log_softmax gradient [N, V] in backward: three fresh logits-sized buffers per micro-batch, each
    page-faulted in (glibc returns blocks over 32 MB to the OS). Here the forward only keeps a logsumexp per row and
    the backward computes exp(x - lse) - onehot chunk by chunk in place. Same math; fp32 rounding differs at ~1e-7.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels != IGNORE
        target = labels.clamp(min=0)
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for r0 in range(0, logits.size(0), _CE_CHUNK_ROWS):
            lse[r0 : r0 + _CE_CHUNK_ROWS] = torch.logsumexp(logits[r0 : r0 + _CE_CHUNK_ROWS].float(), dim=-1)
        picked = logits.gather(1, target[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, target, valid)
        return torch.where(valid, lse - picked, torch.zeros((), dtype=lse.dtype, device=lse.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: torch.Tensor):
        logits, lse, target, valid = ctx.saved_tensors
        g = torch.where(valid, grad_losses.float(), torch.zeros((), dtype=torch.float32, device=lse.device))
        for r0 in range(0, logits.size(0), _CE_CHUNK_ROWS):
            r1 = r0 + _CE_CHUNK_ROWS
            x = logits[r0:r1]
            work = x if x.dtype == torch.float32 else x.float()  # bf16 logits: fp32 math, as F.cross_entropy
            work.sub_(lse[r0:r1, None]).exp_().mul_(g[r0:r1, None])
            work.scatter_add_(1, target[r0:r1, None], -g[r0:r1, None])
            if work is not x:
                x.copy_(work)
        return logits, None


def inplace_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses [N] (0 where labels == IGNORE) of logits [N, V], as `F.cross_entropy(..., reduction="none")`.

    The backward pass overwrites `logits` with their gradient: read them before `backward()`, never after.
    """
    return _InplaceCrossEntropy.apply(logits, labels)
