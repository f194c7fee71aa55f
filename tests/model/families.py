"""Tiny configs of the transformers causal-LM families users bring, each with its real quirks at a testable size:
windows shorter than the test documents, per-layer-type RoPE, MoE, MLA, partial rotary, recurrent hybrids.

Shared by the family tests (tests/model/test_families.py) and the support table (docs/MODELS.md). Built from
transformers' own config classes (`AutoConfig.for_model`), so a family missing from the installed transformers is
reported, not faked."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

VOCAB = 256
WINDOW = 8  # sliding / chunked attention span: shorter than the documents the tests pack

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SLIDING_HYBRID = ["sliding_attention", "full_attention"] * 2

#: model_type -> config overrides on top of _COMMON (None drops a common key the family does not take).
FAMILIES: dict[str, dict[str, Any]] = {
    # Llama-style dense
    "llama": {},
    "gemma": {},
    "qwen2": {},
    "qwen3": {},
    "olmo2": {},
    "smollm3": {"no_rope_layers": [1, 1, 1, 0]},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                "logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.5},
    # partial rotary
    "gpt_neox": {"rotary_pct": 0.25, "head_dim": None, "num_key_value_heads": None},
    "stablelm": {"partial_rotary_factor": 0.25, "head_dim": None},
    "phi": {"partial_rotary_factor": 0.5, "head_dim": None},
    "glm": {"partial_rotary_factor": 0.5},
    # sliding window / chunked attention
    "mistral": {"sliding_window": WINDOW},
    "starcoder2": {"sliding_window": WINDOW, "head_dim": None},
    "cohere2": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID},
    "exaone4": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID},
    "gemma2": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID},
    "gemma3_text": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID},
    "olmo3": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID},
    # per-layer head_dim (global layers twice as wide) and proportional partial RoPE on the global layers
    "gemma4_text": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
                    "per_layer_config": {"01": {"head_dim": 32}, "03": {"head_dim": 32}}},
    "llama4_text": {"attention_chunk_size": WINDOW, "layer_types": ["chunked_attention", "full_attention"] * 2,
                    "no_rope_layers": [1, 0, 1, 0], "num_local_experts": 2, "intermediate_size_mlp": 128},
    "gpt_oss": {"sliding_window": WINDOW, "layer_types": _SLIDING_HYBRID, "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 32,
                                    "rope_theta": 150000.0}},
    # mixture of experts, MLA
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8,
                    "num_key_value_heads": 4},
    # other RoPE constraints
    "phi3": {},
    "ministral3": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
    # recurrent / convolution hybrids
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"] * 2, "num_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                   "linear_value_head_dim": 16},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"] * 2, "linear_num_key_heads": 2,
                     "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16},
    "olmo_hybrid": {"layer_types": ["linear_attention", "full_attention"] * 2, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                    "head_dim": None},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"] * 2, "num_local_experts": 4,
                         "num_experts_per_tok": 2, "shared_intermediate_size": 32, "mamba_n_heads": 4,
                         "mamba_d_state": 16, "mamba_d_head": 32, "mamba_chunk_size": 16, "head_dim": None},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                  "mamba_chunk_size": 16},
    "lfm2": {"layer_types": ["conv", "full_attention"] * 2, "block_ff_dim": 128},
    # learned absolute positions: no RoPE
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "hidden_size": None,
             "intermediate_size": None, "num_hidden_layers": None, "num_attention_heads": None,
             "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": None},
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """The family's tiny config (fp32), `overrides` applied last."""
    kwargs = {**_COMMON, **FAMILIES[model_type], **overrides}
    if "vocab_size_per_layer_input" in kwargs:  # Gemma 4's per-layer input embeddings share the vocabulary
        kwargs["vocab_size_per_layer_input"] = kwargs["vocab_size"]
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not None})
