"""Model adapter: tiny presets, Hugging Face I/O and document-masked packed forward."""

from midtrain.model.attention import document_causal_mask, document_ids, forward_packed, install_document_attention
from midtrain.model.hf import (
    build_model,
    count_parameters,
    load_model,
    load_tokenizer,
    save_hf_checkpoint,
    unwrap_model,
)
from midtrain.model.presets import FULL_ROTARY_ONLY, PRESETS, check_rope_support, preset_config

__all__ = [
    "FULL_ROTARY_ONLY",
    "PRESETS",
    "build_model",
    "check_rope_support",
    "count_parameters",
    "document_causal_mask",
    "document_ids",
    "forward_packed",
    "install_document_attention",
    "load_model",
    "load_tokenizer",
    "preset_config",
    "save_hf_checkpoint",
    "unwrap_model",
]
