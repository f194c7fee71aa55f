"""Document masking for packed sequences (CONTRACTS §2, REFERENCE §5).

A packed row holds several documents; `position_ids` restart at 0 at every document start. Attention must be
causal *and* stay inside a document. We hand transformers an explicit 4D mask because it is returned as-is by
`masking_utils` for every attention backend and does not depend on its packed-sequence detection, which is
skipped as soon as a KV cache exists (the config default `use_cache=True` creates one even in training).
"""

from __future__ import annotations

from typing import Any

import torch

from midtrain.model.hf import unwrap_model

# sdpa treats a bool mask as "True = attend". eager *adds* the mask to the scores, so a bool mask there adds 0/1
# and masks nothing (not even the causal part): it needs an additive float mask.
_BOOL_MASK_IMPLS = frozenset({"sdpa"})
_ADDITIVE_MASK_IMPLS = frozenset({"eager"})


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment index per token: a new segment starts wherever position_ids == 0."""
    return (position_ids == 0).cumsum(dim=-1)


def document_causal_mask(
    position_ids: torch.Tensor, *, additive: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] from `position_ids` [B, T].

    Bool (True = attend) by default; with `additive=True` a float mask of 0 (attend) / finfo(dtype).min.
    """
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [B, T] (got shape {tuple(position_ids.shape)})")
    seg = document_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T(query), T(key)]
    mask = mask[:, None]
    if not additive:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def document_block_mask(position_ids: torch.Tensor):
    """flex_attention BlockMask of the same block-diagonal causal pattern: fully masked blocks are skipped, so the
    cost grows with the sum of squared document lengths, not with T². transformers passes a BlockMask through."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = document_ids(position_ids)

    def same_document_causal(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv)

    b, t = position_ids.shape
    return create_block_mask(same_document_causal, b, None, t, t, device=position_ids.device)


def forward_packed(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Logits [B, T, V] of a packed batch, attention confined to each document. No loss is computed here.

    `model` may be wrapped (DDP, torch.compile): it is called as given so wrappers keep working; the config is read
    from the unwrapped model. Extra `kwargs` go to the model's forward.
    """
    impl = unwrap_model(model).config._attn_implementation
    position_ids = batch["position_ids"]
    if not bool((position_ids[:, 1:] == 0).any()):
        # One document per row: plain causal attention, which sdpa runs without materialising a [T, T] mask.
        mask = None
    elif impl in _BOOL_MASK_IMPLS:
        mask = document_causal_mask(position_ids)
    elif impl in _ADDITIVE_MASK_IMPLS:
        # fp32 scores: the masked entries must dwarf any score; bf16 scores are promoted when added.
        mask = document_causal_mask(position_ids, additive=True, dtype=torch.float32)
    elif impl == "flex_attention":
        mask = document_block_mask(position_ids)
    else:
        raise ValueError(
            f"forward_packed supports attn_implementation 'sdpa', 'eager' or 'flex_attention' (got {impl!r})"
        )
    out = model(
        input_ids=batch["input_ids"],
        position_ids=position_ids,
        attention_mask=mask,
        use_cache=False,
        **kwargs,
    )
    return out.logits
