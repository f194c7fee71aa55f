"""Document masking for packed sequences (CONTRACTS §2, REFERENCE §5).

A packed row holds several documents; `position_ids` restart at 0 at every document start. Attention must be
causal *and* stay inside a document. We hand transformers an explicit 4D mask because it is returned as-is by
`masking_utils` for every attention backend and does not depend on its packed-sequence detection, which is
skipped as soon as a KV cache exists (the config default `use_cache=True` creates one even in training).

On CPU, SDPA with an explicit mask computes every [T, T] block (no causal skipping) and expands GQA heads, which
costs about twice `is_causal` (REFERENCE §5). So for `sdpa` models `forward_packed` also hands the attention a
`DocumentSegments` plan: every document is cut out, documents of similar length are batched into one
`is_causal=True` SDPA call, and the attention costs about the sum of squared document lengths instead of B x T².
The plan travels as a model kwarg to midtrain's wrapper of transformers' "sdpa" attention function, which
`forward_packed` installs (`install_document_attention`, idempotent; importing this module registers nothing);
without a plan (evaluation, generation, other callers) the wrapper is transformers' own function. The 4D mask is
still passed, so a model whose attention bypasses the wrapper stays correct, only slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from midtrain.model.families import layer_types, packing_mode, sliding_window
from midtrain.model.head import HeadInputs, chunkable_head, gathered_weight, hidden_states_only
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


def layer_type_masks(config: Any, position_ids: torch.Tensor) -> Any:
    """Per-layer-type document masks for a family with windowed or chunked layers: {layer type: mask} for a
    hybrid (transformers' models take such a mapping as given), one mask for a uniform family (Mistral).

    A sliding layer attends the last `sliding_window` tokens (transformers' `kv > q - window`), a chunked layer the
    tokens of its chunk, and each only within the document. Chunks are counted from the document's start (its
    position ids), as the document alone would see them, not from the row's start.
    """
    impl = config._attn_implementation
    window, chunk = sliding_window(config), getattr(config, "attention_chunk_size", None)
    seg, t = document_ids(position_ids), position_ids.shape[-1]
    index = torch.arange(t, device=position_ids.device)

    def allowed(layer_type: str):
        def mask_mod(b, h, q, kv):
            keep = (seg[b, q] == seg[b, kv]) & (q >= kv)
            if layer_type == "sliding_attention" and window is not None:
                keep = keep & (kv > q - window)
            if layer_type == "chunked_attention" and chunk:
                keep = keep & (position_ids[b, q] // chunk == position_ids[b, kv] // chunk)
            return keep

        return mask_mod

    def build(layer_type: str) -> Any:
        mod = allowed(layer_type)
        if impl == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            return create_block_mask(mod, position_ids.shape[0], None, t, t, device=position_ids.device)
        rows = torch.arange(position_ids.shape[0], device=position_ids.device)
        dense = mod(rows[:, None, None], None, index[None, :, None], index[None, None, :])[:, None]  # [B, 1, T, T]
        if impl in _BOOL_MASK_IMPLS:
            return dense
        if impl in _ADDITIVE_MASK_IMPLS:
            return torch.where(dense, torch.zeros((), dtype=torch.float32), torch.finfo(torch.float32).min)
        raise ValueError(f"forward_packed supports attn_implementation 'sdpa', 'eager' or 'flex_attention' "
                         f"(got {impl!r})")

    types = sorted(set(layer_types(config)))
    masks = {layer_type: build(layer_type) for layer_type in types}
    return masks[types[0]] if len(types) == 1 else masks


# --------------------------------------------------------------------------- per-document attention


# Fixed cost of one SDPA call, as the side of an equally expensive window in units of T: (T * GROUP_COST)² token².
GROUP_COST = 1 / 4
# Use the plan only if its estimated work (sum of count * width² plus the calls' fixed costs) is at most this
# fraction of the dense mask's B * T²: below ~2x the saving is eaten by the extra kernels (measured, docs/PERFORMANCE).
WORTH_IT = 0.5


@dataclass(frozen=True)
class DocumentSegments:
    """Where each document of a packed [B, T] batch sits, grouped for batched `is_causal` SDPA calls.

    Tokens are addressed in the flattened [B*T] order. Group g holds `counts[g]` windows of `widths[g]` tokens;
    window i of a group starts at a document's first token and covers the document (width >= its length). Tokens
    of a window past the document's end are never attended by the document's queries (causal), so they may be
    anything: their outputs are dropped and their gradients are exactly zero. `gather` lists every window's token
    indices, group after group; `scatter[t]` is the row of token t's output in that concatenation; `padding` lists
    the window rows past a document's end.
    """

    batch: int
    seq_len: int
    widths: tuple[int, ...]
    counts: tuple[int, ...]
    gather: torch.Tensor  # [sum(counts * widths)] int64
    scatter: torch.Tensor  # [B * T] int64
    padding: torch.Tensor  # [sum(counts * widths) - B * T] int64

    def cost(self) -> float:
        """Estimated attention work in token² units (the dense mask path: batch * seq_len²)."""
        fixed = (self.seq_len * GROUP_COST) ** 2
        return sum(n * w * w + fixed for n, w in zip(self.counts, self.widths))

    def worth_it(self) -> bool:
        return self.cost() <= WORTH_IT * self.batch * self.seq_len**2

    @staticmethod
    def from_position_ids(
        position_ids: torch.Tensor, quantum: int | None = None, group_cost: float | None = None
    ) -> DocumentSegments:
        """Documents start where position_ids == 0 (and at every row start).

        Lengths are first rounded up to a multiple of `quantum` (default T // 64), then grouped so that
        sum over groups of (group_cost + count * width²) is smallest (`_group_widths`): each SDPA call has a fixed
        cost (several thread-pool barriers, expensive on a loaded machine) next to its work (∝ width²).
        `group_cost` is in token² units, default (T * GROUP_COST)²; 0 with `quantum=1` gives one group per distinct
        length.
        """
        b, t = position_ids.shape
        device = position_ids.device
        flat = position_ids.reshape(-1)
        is_start = flat == 0
        is_start[::t] = True
        starts = is_start.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=torch.tensor([b * t], device=device))
        q = quantum or max(1, t // 64)
        rounded = torch.clamp((lengths + q - 1) // q * q, max=t)
        values, counts = torch.unique(rounded, return_counts=True)
        cost = (t * GROUP_COST) ** 2 if group_cost is None else group_cost
        width_of = dict(zip(values.tolist(), _group_widths(values.tolist(), counts.tolist(), cost)))
        widths = torch.tensor([width_of[w] for w in rounded.tolist()], device=device)
        order = torch.argsort(widths, stable=True)
        group_widths, group_counts = torch.unique_consecutive(widths[order], return_counts=True)
        gathers, paddings, scatter = [], [], torch.empty(b * t, dtype=torch.long, device=device)
        offset = 0
        for w, idx in zip(group_widths.tolist(), torch.split(order, group_counts.tolist())):
            j = torch.arange(w, device=device)
            inside = j[None, :] < lengths[idx, None]  # [n, w]
            tokens = starts[idx, None] + j[None, :]
            gathers.append(torch.where(inside, tokens, starts[idx, None]).reshape(-1))
            rows = offset + torch.arange(len(idx) * w, device=device).view(len(idx), w)
            scatter[tokens[inside]] = rows[inside]
            paddings.append(rows[~inside])
            offset += len(idx) * w
        return DocumentSegments(b, t, tuple(group_widths.tolist()), tuple(group_counts.tolist()),
                                torch.cat(gathers), scatter, torch.cat(paddings))


def _group_widths(values: list[int], counts: list[int], group_cost: float) -> list[int]:
    """Window width for each of the sorted distinct lengths `values` (with `counts` documents each): contiguous runs
    share their largest value as width, the runs chosen by dynamic programming to minimise
    sum(group_cost + documents * width²). O(len(values)²), and len(values) <= 64 after rounding."""
    k = len(values)
    best = [0.0] + [float("inf")] * k
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        n, w2 = 0, values[j - 1] ** 2
        for i in range(j - 1, -1, -1):  # group = values[i:j]
            n += counts[i]
            c = best[i] + group_cost + n * w2
            if c < best[j]:
                best[j], cut[j] = c, i
    out = [0] * k
    j = k
    while j > 0:
        i = cut[j]
        out[i:j] = [values[j - 1]] * (j - i)
        j = i
    return out


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: DocumentSegments,
    *,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Document-causal attention of query [B, H, T, D] and key/value [B, Hkv, T, D] -> output [B, T, H, D].

    Equal to SDPA with `document_causal_mask`, at the cost of one `is_causal` SDPA call per window width.
    """
    b, h, t = query.shape[:3]
    into_windows = (segments.gather, None, segments.scatter, None)
    from_windows = (segments.scatter, None, segments.gather, segments.padding)

    def windows(x: torch.Tensor) -> list[torch.Tensor]:  # [B, H, T, D] -> per group [n, H, w, D]
        flat = x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[-1])
        picked = _RowGather.apply(flat, *into_windows)
        picked = picked.split([n * w for n, w in zip(segments.counts, segments.widths)])
        return [p.view(n, w, x.shape[1], x.shape[-1]).transpose(1, 2) for p, n, w in
                zip(picked, segments.counts, segments.widths)]

    gqa = key.shape[1] != h
    outs = [
        F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
        .transpose(1, 2)
        .reshape(-1, h, value.shape[-1])
        for qg, kg, vg in zip(windows(query), windows(key), windows(value))
    ]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return _RowGather.apply(out, *from_windows).view(b, t, h, value.shape[-1])


class _RowGather(torch.autograd.Function):
    """y = x[index] (rows in `zero` set to 0), where x[i] = y[back_index] (rows `back_zero` 0) inverts it: the
    gradient is a gather too. `index_select`'s own backward would zero-fill a buffer and scatter-add into it."""

    @staticmethod
    def forward(ctx, x, index, zero, back_index, back_zero):
        ctx.back = (back_index, back_zero)
        y = x.index_select(0, index)
        return y if zero is None else y.index_fill_(0, zero, 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        back_index, back_zero = ctx.back
        g = grad.index_select(0, back_index)
        return (g if back_zero is None else g.index_fill_(0, back_zero, 0)), None, None, None, None


def use_segments(model: torch.nn.Module, position_ids: torch.Tensor) -> bool:
    """Per-document attention where it is measured to pay: CPU, eager (not torch.compile: the plan's Python ints
    would recompile every step), and a family whose every layer attends the whole document (`packing_mode`)."""
    if position_ids.device.type != "cpu" or _is_compiled(model):
        return False
    return packing_mode(unwrap_model(model).config, position_ids.shape[-1]) == "document_mask"


def _is_compiled(model: torch.nn.Module) -> bool:
    while True:
        if hasattr(model, "_orig_mod"):
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return False
        model = inner


def _wrap_sdpa(original: Callable) -> Callable:
    def sdpa_with_document_segments(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                    is_causal=None, **kwargs):
        segments = kwargs.pop("document_segments", None)
        if (
            segments is None
            or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None
            or kwargs.get("softcap") is not None
            or not getattr(module, "is_causal", True)
            or is_causal is False
            or query.shape[2] != segments.seq_len
            or key.shape[2] != segments.seq_len
            or torch.compiler.is_compiling()
        ):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        return segment_attention(query, key, value, segments, scale=scaling, dropout=dropout), None

    sdpa_with_document_segments.__wrapped__ = original  # type: ignore[attr-defined]
    return sdpa_with_document_segments


def install_document_attention() -> None:
    """Wrap transformers' global "sdpa" attention function so that a `document_segments` plan runs as per-document
    attention (without a plan the wrapper is transformers' own function). Idempotent: never wraps the wrapper.

    Explicit, not done on import: `forward_packed` calls it before it hands a model a plan, so importing
    midtrain.model changes nothing in transformers.
    """
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(current, "__name__", "") != "sdpa_with_document_segments":
        AttentionInterface.register("sdpa", _wrap_sdpa(current))


def per_document_plan(position_ids: torch.Tensor) -> DocumentSegments:
    """How `forward_packed` runs a packed batch document by document (families with recurrent layers): documents of
    similar length share one call, right-padded to the group's width. Deterministic in `position_ids`, so a caller
    can map what the calls produced (router logits) back to tokens."""
    return DocumentSegments.from_position_ids(position_ids, quantum=1)


def forward_packed(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    segments: bool | None = None,
    loss_chunk_tokens: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | HeadInputs:
    """Logits [B, T, V] of a packed batch, each document computed as it would be alone. No loss is computed here.

    How depends on the family's layers (`midtrain.model.families.packing_mode`): full-attention layers share one
    block-diagonal causal mask (midtrain's, with per-document SDPA on CPU); windowed or chunked layers get a mask
    per layer type (`layer_type_masks`: the document mask and-ed with the window or chunk); layers with a recurrent
    or convolution state run every document alone (`per_document_plan`).

    With `loss_chunk_tokens`, the head's inputs instead (`HeadInputs`: final hidden states and head weight), for
    `token_loss_sums` to apply the head that many rows at a time; ValueError for a head it cannot reproduce.

    `model` may be wrapped (DDP, torch.compile): it is called as given so wrappers keep working; the config is read
    from the unwrapped model. `segments` picks per-document `is_causal` attention for multi-document rows of `sdpa`
    models (None: where it pays, see `use_segments` and `DocumentSegments.worth_it`; False: the 4D mask alone; True:
    always). Extra `kwargs` go to the forward.
    """
    config = unwrap_model(model).config
    impl = config._attn_implementation
    position_ids = batch["position_ids"]
    packed = bool((position_ids[:, 1:] == 0).any())
    mode = packing_mode(config, position_ids.shape[-1])
    if packed and mode == "per_document":
        return _forward_documents_alone(model, batch, loss_chunk_tokens, kwargs)
    if not packed:
        mask = None  # one document per row: plain causal attention, which sdpa runs without a [T, T] mask
    elif mode == "layer_masks":
        if segments:
            raise ValueError("forward_packed(segments=True) needs a model without sliding-window attention")
        mask = layer_type_masks(config, position_ids)
    elif impl in _BOOL_MASK_IMPLS:
        mask = document_causal_mask(position_ids)
        if segments is None and use_segments(model, position_ids):
            plan = DocumentSegments.from_position_ids(position_ids)
            if plan.worth_it():
                kwargs["document_segments"] = plan
        elif segments:
            kwargs["document_segments"] = DocumentSegments.from_position_ids(position_ids)
    elif impl in _ADDITIVE_MASK_IMPLS:
        # fp32 scores: the masked entries must dwarf any score; bf16 scores are promoted when added.
        mask = document_causal_mask(position_ids, additive=True, dtype=torch.float32)
    elif impl == "flex_attention":
        mask = document_block_mask(position_ids)
    else:
        raise ValueError(
            f"forward_packed supports attn_implementation 'sdpa', 'eager' or 'flex_attention' (got {impl!r})"
        )
    if "document_segments" in kwargs:
        install_document_attention()  # the plan is read by midtrain's wrapper of transformers' "sdpa" function
    head = None if loss_chunk_tokens is None else chunkable_head(model)
    with contextlib.nullcontext() if head is None else hidden_states_only(head):
        out = model(
            input_ids=batch["input_ids"],
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=False,
            **kwargs,
        )
    return out.logits if head is None else HeadInputs(out.logits, gathered_weight(head), loss_chunk_tokens)


def _forward_documents_alone(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_chunk_tokens: int | None, kwargs: dict[str, Any]
) -> torch.Tensor | HeadInputs:
    """`forward_packed` for families whose layers carry state along the row: one call per group of documents of
    similar length, each document from position 0 in a row of its own, right-padded (causal: padding after a
    document never reaches it); outputs scattered back to the packed layout, padding rows dropped."""
    position_ids = batch["position_ids"]
    b, t = position_ids.shape
    plan = per_document_plan(position_ids)
    ids = batch["input_ids"].reshape(-1)
    head = None if loss_chunk_tokens is None else chunkable_head(model)
    outs, offset = [], 0
    with contextlib.nullcontext() if head is None else hidden_states_only(head):
        for n, w in zip(plan.counts, plan.widths):
            rows = ids[plan.gather[offset : offset + n * w]].view(n, w)
            positions = torch.arange(w, device=ids.device).expand(n, w)
            out = model(input_ids=rows, position_ids=positions, use_cache=False, **kwargs)
            outs.append(out.logits.reshape(n * w, -1))
            offset += n * w
    values = torch.cat(outs) if len(outs) > 1 else outs[0]
    values = values.index_select(0, plan.scatter).view(b, t, -1)
    return values if head is None else HeadInputs(values, gathered_weight(head), loss_chunk_tokens)
