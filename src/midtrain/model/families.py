"""What midtrain needs to know about a transformers causal-LM family, read from its config and model class only.

The trainer never branches on a family's name: it asks these questions. Each layer's type (transformers'
`config.layer_types`, or what a family without that field implies) decides how a packed row is attended
(`packing_mode`); the model class says which attention implementations the family offers (`choose_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# Layer types whose token mixing is attention under a mask: a document boundary is a mask entry.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# Layer types that carry a recurrent or convolution state along the row. transformers' CPU kernels for them take no
# document boundaries (no sequence index / state reset), so a packed row would leak state from one document into
# the next: such families run every document alone (`packing_mode` "per_document").
# ("hybrid": a layer with a state-space mixer beside its attention, as in Falcon-H1.) A layer type outside both sets
# is unknown to midtrain: it runs documents alone too, which is right whatever the layer computes.
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "mamba2", "recurrent", "rwkv", "ssm",
                                   "hybrid", "hybrid_sliding"})
# Families without `layer_types` whose every layer is recurrent.
RECURRENT_MODEL_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"})

PackingMode = Literal["document_mask", "layer_masks", "per_document"]


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's type, as transformers names them. Families without `layer_types` are uniform: sliding
    when the config enables a window (Mistral, Starcoder2), recurrent for the pure state-space families, else full."""
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    declared = getattr(config, "layer_types", None)
    if declared:
        return [str(t) for t in declared]
    if getattr(config, "model_type", None) in RECURRENT_MODEL_TYPES:
        return ["recurrent"] * n
    if sliding_window(config) is not None:
        return ["sliding_attention"] * n
    if getattr(config, "attention_chunk_size", None):
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def sliding_window(config: Any) -> int | None:
    """The window of the config's sliding layers, None when it has none (or disables them: `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def unknown_layer_types(config: Any) -> list[str]:
    """Layer types midtrain does not know how to pack (neither attention nor a known recurrent kind)."""
    known = ATTENTION_LAYER_TYPES | RECURRENT_LAYER_TYPES | {"recurrent"}
    return sorted({t for t in layer_types(config) if t not in known})


def is_recurrent(config: Any) -> bool:
    """Whether any layer carries state along the row (linear attention, convolution, state-space)."""
    return any(t in RECURRENT_LAYER_TYPES or t == "recurrent" for t in layer_types(config))


def packing_mode(config: Any, seq_len: int) -> PackingMode:
    """How a packed row of `seq_len` tokens must be run so that every document sees only itself, as it would alone:

    - "document_mask": every layer attends the full causal prefix, so one block-diagonal causal mask serves all
      layers (midtrain's own mask and per-document SDPA, the fast path);
    - "layer_masks": some layers attend a window or a chunk shorter than the row: each layer type gets its own
      document mask, and-ed with its window or chunk counted in positions inside the document;
    - "per_document": some layers carry state along the row: every document runs alone.
    """
    types = layer_types(config)
    if any(t not in ATTENTION_LAYER_TYPES for t in types):
        return "per_document"
    window = sliding_window(config)
    chunk = getattr(config, "attention_chunk_size", None)
    if ("sliding_attention" in types and window is not None and window < seq_len) or (
        "chunked_attention" in types and chunk and int(chunk) < seq_len
    ):
        return "layer_masks"
    return "document_mask"


def describe_packing(config: Any, seq_len: int) -> str:
    """One line on how packed rows of this family are run (printed at each stage's start)."""
    mode = packing_mode(config, seq_len)
    if mode == "per_document":
        unknown = unknown_layer_types(config)
        if unknown:
            return (f"packed rows: every document runs alone (layer types {', '.join(unknown)} are unknown to "
                    "midtrain, and a document alone is right whatever they compute)")
        kinds = sorted({t for t in layer_types(config) if t not in ATTENTION_LAYER_TYPES})
        return (f"packed rows: every document runs alone ({', '.join(kinds)} layers carry state along the row, "
                "which transformers cannot reset at a document boundary)")
    if mode == "layer_masks":
        limits = []
        if sliding_window(config) is not None and "sliding_attention" in layer_types(config):
            limits.append(f"sliding window {sliding_window(config)}")
        if getattr(config, "attention_chunk_size", None):
            limits.append(f"attention chunks of {config.attention_chunk_size}")
        return f"packed rows: a document mask per layer type ({', '.join(limits)} < seq_len {seq_len})"
    return "packed rows: one document-causal mask for all layers"


def model_class(config: Any) -> type:
    """The transformers causal-LM class `AutoModelForCausalLM` builds for `config`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no causal-LM class for model_type {config.model_type!r}") from None


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    reason: str

    def __str__(self) -> str:
        return f"attention: {self.implementation} ({self.reason})"


def choose_attention(config: Any, requested: str = "auto", device_type: str = "cpu") -> AttentionChoice:
    """The attention implementation to load, train, export and evaluate a family with.

    `auto`: sdpa where the family offers it (fused kernels; midtrain's per-document SDPA on CPU), else eager (the
    families whose attention sdpa cannot express: soft-capped logits, attention sinks). flex_attention is never
    chosen automatically: its CPU backward is missing in torch 2.13 and on GPU it compiles per shape. An explicit
    request the family does not offer raises ValueError naming the ones it does.
    """
    cls = model_class(config)
    offered = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        offered.insert(0, "sdpa")
    if getattr(cls, "_supports_flex_attn", False):
        offered.append("flex_attention")
    if requested == "auto":
        if "sdpa" in offered:
            return AttentionChoice("sdpa", f"the fastest {cls.__name__} offers on {device_type}")
        return AttentionChoice("eager", f"{cls.__name__} does not offer sdpa")
    if requested not in offered:
        raise ValueError(f"{cls.__name__} does not offer attention {requested!r} (it offers: {', '.join(offered)}); "
                         "use attention: auto")
    return AttentionChoice(requested, "as the recipe asks")


def decoder_layer_classes(model: Any) -> tuple[type, ...]:
    """The classes of a model's repeated blocks (what FSDP shards one by one and activation checkpointing wraps):
    transformers' `_no_split_modules` names them; classes ending in DecoderLayer otherwise."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return tuple(sorted(found, key=lambda c: c.__name__))
