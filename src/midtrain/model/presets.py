"""Tiny model configs for tests, the demo and benchmarks (no download: built from config kwargs)."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

# Families whose modeling code in transformers 5.x rotates the *whole* head: with `partial_rotary_factor` < 1 the
# default RoPE silently ignores it and every scaled RoPE type crashes on a shape mismatch (measured on 5.23).
FULL_ROTARY_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# `model_type` picks the config class; everything else is that class's kwargs. Special token ids are left unset:
# they belong to the tokenizer and are passed to `preset_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    },
    # tiny-llama with 4 heads of 32 instead of 2 of 64: the same parameters and FLOPs, but it learns precise
    # retrieval (copying a 5-digit key) where 2 heads plateau at ~0.8 with digits out of order, and keeps it through
    # a 4x YaRN extension (docs/DEMO.md). The demo's model.
    "tiny-llama-4h": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    },
    # Qwen2-style: GQA, qkv bias, large theta and tied embeddings (as in Qwen2-0.5B).
    "tiny-qwen2": {
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True,
    },
    # REFERENCE §9 benchmark model: ≈7.2M parameters at vocab 8192.
    "small-llama": {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    },
    "medium-llama": {
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    },
}

_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_rope_support(config: PretrainedConfig) -> None:
    """Raise ValueError when `config` asks for partial rotary on a family that cannot apply it."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if config.model_type in FULL_ROTARY_ONLY and factor is not None and float(factor) != 1.0:
        raise ValueError(
            f"{config.model_type!r} models in transformers rotate the full head and ignore or crash on "
            f"partial_rotary_factor={factor}; use a family that applies it (e.g. phi3, stablelm, glm)"
        )


def preset_config(name: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """Build the config of preset `name` with `vocab_size`; `overrides` replace preset kwargs.

    A `rope_parameters` override is merged into the preset's dict so `rope_theta` is kept unless given
    (replacing the dict would silently fall back to transformers' default theta).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive (got {vocab_size})")
    kwargs = copy.deepcopy(PRESETS[name])
    model_type = kwargs.pop("model_type")
    for key in _TOKEN_ID_KEYS:
        kwargs[key] = None
    rope_override = overrides.pop("rope_parameters", None)
    if rope_override is not None:
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], **copy.deepcopy(rope_override)}
    kwargs.update(overrides)
    for key in _TOKEN_ID_KEYS:
        token_id = kwargs[key]
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"{key}={token_id} is outside the vocabulary [0, {vocab_size})")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    check_rope_support(config)
    return config
