"""Token losses of the model's head: per-source sums, the in-place fp32 cross-entropy, and the chunked linear
cross-entropy that never materialises the full logits. Used by training and by evaluation alike (it sits below both).

Sums, normalised by the global batch's label count: summing here and dividing by the global count (not averaging
per micro-batch) makes the gradient independent of how the global batch is split into ranks and micro-batches.

`linear_cross_entropy`: cross-entropy of a bias-free linear head, a chunk of rows at a time, so the [N, V]
logits never exist in full.

With a 128k vocabulary an 8k-token micro-batch has 4 GB of fp32 logits and as much again for their gradient. Here
the forward walks `chunk_tokens` rows at a time: logits (compute dtype), log-sum-exp (fp32), the per-token loss, and
at once the chunk's gradient — softmax - onehot, turned into d(hidden) [rows, d] and accumulated into d(weight)
[V, d] in fp32. The backward only scales those two by the upstream scalar gradient (the sum is linear in it).
Peak extra memory: a few [chunk_tokens, V] buffers plus d(hidden) [N, d] and an fp32 [V, d].

Autocast: `torch.amp.custom_fwd` takes one fixed device type at decoration time, so the autocast state is read here
for the hidden states' device and the forward runs with autocast off and explicit casts — what
`custom_fwd(cast_inputs=...)` does, for any device. The backward does no matmul, so its autocast state is moot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midtrain.model.head import HeadInputs

IGNORE = -100


def token_loss_sums(
    logits: torch.Tensor | HeadInputs,
    labels: torch.Tensor,
    source_ids: torch.Tensor,
    n_sources: int,
    *,
    reuse_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sum of token losses, per-source loss sums [n_sources], per-source token counts [n_sources]).

    HF convention: logits at position t predict labels[t + 1]. With `reuse_logits` (the trainer's choice) and fp32
    logits that require grad, the logits' storage becomes their gradient (`inplace_cross_entropy`): the caller must
    not read `logits` after this call. bf16/fp16 logits are left alone: their fp32 upcast is the buffer reused.
    `HeadInputs` (from `forward_packed(..., loss_chunk_tokens=n)`) instead of logits: the head is applied n rows at
    a time (`linear_cross_entropy`), never materialising the full logits.
    """
    shift_labels, shift_sources = shifted_targets(labels, source_ids)
    if isinstance(logits, HeadInputs):
        hidden = logits.hidden.reshape(-1, logits.hidden.size(-1))
        total, losses = linear_cross_entropy(hidden, logits.weight, shift_labels, logits.chunk_tokens)
        return (total, *_per_source(losses, shift_labels, shift_sources, n_sources))
    flat = logits.reshape(-1, logits.size(-1))
    training = reuse_logits and torch.is_grad_enabled() and logits.requires_grad
    # Only a tensor the forward made for us (not a leaf, not a view of another tensor) may be overwritten.
    if training and logits.dtype == torch.float32 and logits.grad_fn is not None and not logits._is_view():
        losses = inplace_cross_entropy(flat, shift_labels)
    elif training and logits.dtype in (torch.bfloat16, torch.float16):
        # bf16 autocast: the fp32 upcast is a fresh tensor nobody else reads, so it can become its own gradient
        # (1.5x faster than F.cross_entropy on it here, and two fewer fp32 logits-sized buffers).
        losses = inplace_cross_entropy(flat.float(), shift_labels)
    else:
        losses = F.cross_entropy(flat.float(), shift_labels, ignore_index=IGNORE, reduction="none")
    return (losses.sum(), *_per_source(losses, shift_labels, shift_sources, n_sources))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 losses [N] (0 where nothing is predicted) and the source of each predicted token [N] (-1 where
    nothing is predicted), with the same shift as `token_loss_sums`: what a per-domain reweighting (DoReMi) needs."""
    shift_labels, shift_sources = shifted_targets(labels, source_ids)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shift_labels, ignore_index=IGNORE,
                             reduction="none")
    return losses, shift_sources


def shifted_targets(labels: torch.Tensor, source_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat [N] targets of the logits at each position (HF convention: position t predicts labels[t + 1]) and the
    source of each, -1 where nothing is predicted. Shifting the labels, not the logits: slicing [B, T, V] logits
    copies the largest tensor of the step."""
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    src = F.pad(source_ids[:, 1:], (0, 1), value=-1).reshape(-1)
    return shift_labels, torch.where(shift_labels == IGNORE, -1, src)


def _per_source(
    losses: torch.Tensor, shift_labels: torch.Tensor, shift_sources: torch.Tensor, n_sources: int
) -> tuple[torch.Tensor, torch.Tensor]:
    valid = shift_labels != IGNORE
    src = shift_sources.clamp(min=0)  # -1 (nothing predicted) counts nowhere: `valid` zeroes it
    detached = losses.detach() * valid
    per_source = torch.zeros(n_sources, dtype=torch.float32, device=losses.device).index_add_(0, src, detached)
    counts = torch.zeros(n_sources, dtype=torch.float32, device=losses.device).index_add_(0, src, valid.float())
    return per_source, counts


def label_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


class _InplaceCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of fp32 logits that turns the logits into their own gradient.

    `F.cross_entropy` on [N, V] logits materialises log_softmax [N, V] in forward, then a zero-filled one-hot
    gradient and a log_softmax gradient [N, V] in backward: three fresh logits-sized buffers per micro-batch, each
    page-faulted in (glibc returns blocks over 32 MB to the OS), in five passes. Here the forward computes
    softmax - onehot in the logits' storage (max, exp, sum, divide, one scatter) and keeps only that; the backward
    scales its rows by the upstream gradient. No temporaries, few large kernels (each a thread-pool barrier, which
    is what costs on a loaded machine). Same math; fp32 rounding differs at ~1e-7.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels != IGNORE
        target = labels.clamp(min=0)[:, None]
        picked = logits.gather(1, target).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(top).exp_()  # in place: from here on the storage holds the gradient's pieces
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total).scatter_add_(1, target, -valid.to(probs.dtype)[:, None])  # softmax - onehot
        lse = top.squeeze(1) + total.squeeze(1).log()
        ctx.save_for_backward(probs, valid)
        return torch.where(valid, lse - picked, torch.zeros((), dtype=lse.dtype, device=lse.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: torch.Tensor):
        grad, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_losses, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return grad.mul_(scale[:, None]), None


def inplace_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses [N] (0 where labels == IGNORE) of fp32 logits [N, V], as
    `F.cross_entropy(..., reduction="none")`. Overwrites `logits`: read them before this call, never after."""
    if logits.dtype != torch.float32:
        raise ValueError(f"inplace_cross_entropy needs fp32 logits (got {logits.dtype})")
    return _InplaceCrossEntropy.apply(logits, labels)


# ------------------------------------------------------------------------- chunked linear cross-entropy
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, per-token losses [N] detached) of logits = hidden [N, d] @ weight[V, d].T against
    `labels` [N] (already aligned with the rows; IGNORE rows count 0). Same as `F.cross_entropy(logits.float(), ...,
    reduction="none")` over the full logits, which are computed in the autocast dtype when autocast is on (as
    `nn.Linear` would), else in the inputs' promoted dtype. Differentiable in `hidden` and `weight` through the sum
    only; the per-token losses are for reporting."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
    else:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    grads = (hidden.requires_grad, weight.requires_grad)
    if not torch.is_grad_enabled() or not any(grads):  # evaluation: losses only
        with torch.autocast(device, enabled=False):
            total, losses, _, _ = _chunks(hidden, weight, labels, chunk_tokens, compute, (False, False))
        return total, losses
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, compute, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, compute, grads):
        with torch.autocast(hidden.device.type, enabled=False):
            total, losses, grad_hidden, grad_weight = _chunks(hidden, weight, labels, chunk_tokens, compute, grads)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_losses):
        if getattr(ctx, "used", False):  # the stored gradients were scaled in place by the first backward
            raise RuntimeError("linear_cross_entropy supports one backward per forward (no retain_graph reuse)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    compute: torch.dtype,
    grads: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss sum, per-token losses, and (where `grads` asks) d(sum)/d(hidden) in hidden's dtype and
    d(sum)/d(weight) in fp32. Runs without autograd: every buffer is freed or reused before the next chunk."""
    n = hidden.shape[0]
    w = weight.detach().to(compute)  # one [V, d] copy under bf16 autocast, as autocast's own cast of the weight
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grads[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
    with torch.no_grad():
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            h = hidden[start:end].detach().to(compute)
            target = labels[start:end]
            valid = target != IGNORE
            target = target.clamp(min=0)[:, None]
            z = g = None  # the previous chunk's [rows, V] buffers go before this chunk's are allocated
            z = (h @ w.T).float()  # [rows, V] fp32 (no copy when the compute dtype is fp32)
            # In z's storage from here on (no [rows, V] temporaries, unlike torch.logsumexp): exp, then the
            # gradient d(loss)/d(logits) = softmax - onehot, zero on ignored rows.
            picked = z.gather(1, target).squeeze(1)
            top = z.amax(dim=1, keepdim=True)
            total = z.sub_(top).exp_().sum(dim=1, keepdim=True)
            lse = (top + total.log()).squeeze(1)
            losses[start:end] = torch.where(valid, lse - picked, 0.0)
            if grad_hidden is None and grad_weight is None:
                continue
            z.div_(total).scatter_add_(1, target, -torch.ones_like(total))
            g = z.mul_(valid[:, None].to(z.dtype)).to(compute)
            z = None  # bf16: the fp32 copy is not needed for the matmuls
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ w
            if grad_weight is not None:
                if compute == torch.float32:
                    grad_weight.addmm_(g.T, h)
                else:  # bf16 matmul (fp32 accumulation inside), summed over chunks in fp32
                    grad_weight += g.T @ h
    return losses.sum(), losses, grad_hidden, grad_weight
