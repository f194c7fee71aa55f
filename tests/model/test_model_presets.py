"""Presets: sizes against hand-computed parameter formulas, override semantics, errors."""

import pytest

from midtrain.model import PRESETS, build_model, count_parameters, preset_config


def _llama_like_params(c, *, qkv_bias: bool) -> dict[str, int]:
    """Parameter count of a Llama/Qwen2 decoder from its config (the oracle for count_parameters)."""
    h, v, i, hd = c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim
    nq, nkv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = h * nq + 2 * h * nkv + nq * h + ((nq + 2 * nkv) if qkv_bias else 0)
    layer = attn + 3 * h * i + 2 * h  # MLP (gate, up, down) + two RMSNorms
    emb = v * h
    head = 0 if c.tie_word_embeddings else v * h
    total = emb + c.num_hidden_layers * layer + h + head  # + final norm
    return {"total": total, "embedding": emb, "lm_head": head, "non_embedding": total - emb}


@pytest.mark.parametrize("name,qkv_bias", [("tiny-llama", False), ("tiny-llama-4h", False), ("tiny-qwen2", True),
                                           ("small-llama", False)])
def test_count_parameters_matches_formula(name, qkv_bias):
    config = preset_config(name, vocab_size=8192)
    assert count_parameters(build_model(config, seed=0)) == _llama_like_params(config, qkv_bias=qkv_bias)


def test_preset_shapes():
    small = preset_config("small-llama", 8192)
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads) == (
        256, 4, 4, 2)
    # REFERENCE §9 benchmark model is ≈7M parameters at vocab 8192.
    assert 7.0e6 < _llama_like_params(small, qkv_bias=False)["total"] < 7.4e6
    qwen = preset_config("tiny-qwen2", 1000)
    assert (qwen.model_type, qwen.num_attention_heads, qwen.num_key_value_heads) == ("qwen2", 4, 2)
    medium = preset_config("medium-llama", 1000)
    assert (medium.hidden_size, medium.num_hidden_layers, medium.num_key_value_heads) == (512, 8, 4)
    tiny = preset_config("tiny-llama", 1000)
    assert tiny.model_type == "llama" and not tiny.tie_word_embeddings
    assert tiny.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    # the demo's model: tiny-llama's parameters and FLOPs split into 4 heads of 32
    four = preset_config("tiny-llama-4h", 1000)
    assert (four.num_attention_heads, four.num_key_value_heads, four.head_dim) == (4, 4, 32)
    assert _llama_like_params(four, qkv_bias=False) == _llama_like_params(tiny, qkv_bias=False)
    assert set(PRESETS) >= {"tiny-llama", "tiny-llama-4h", "tiny-qwen2", "small-llama", "medium-llama"}


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*small-llama.*tiny-llama.*tiny-qwen2"):
        preset_config("gpt5", 100)


def test_special_tokens_and_overrides():
    c = preset_config("tiny-llama", 300, bos_token_id=256, eos_token_id=257, pad_token_id=258, num_hidden_layers=3)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.vocab_size) == (256, 257, 258, 300)
    assert c.num_hidden_layers == 3
    default = preset_config("tiny-llama", 300)
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (None, None, None)
    with pytest.raises(ValueError, match="eos_token_id=300 is outside"):
        preset_config("tiny-llama", 300, eos_token_id=300)
    # the preset dict is not mutated by overrides
    assert PRESETS["tiny-llama"]["num_hidden_layers"] == 2


def test_rope_override_keeps_theta():
    c = preset_config("tiny-qwen2", 100, rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert c.rope_parameters == {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}
    c = preset_config("tiny-llama", 100, rope_parameters={"rope_theta": 5e5})
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert PRESETS["tiny-qwen2"]["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000.0}


def test_partial_rotary_rejected_where_transformers_ignores_it():
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        preset_config("tiny-llama", 100, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        preset_config("tiny-qwen2", 100, rope_parameters={"partial_rotary_factor": 0.25})
    assert preset_config("tiny-llama", 100, partial_rotary_factor=1.0).rope_parameters["partial_rotary_factor"] == 1.0


def test_tied_embeddings_follow_preset():
    qwen = build_model(preset_config("tiny-qwen2", 50), seed=0)
    llama = build_model(preset_config("tiny-llama", 50), seed=0)
    assert qwen.get_output_embeddings().weight is qwen.get_input_embeddings().weight
    assert llama.get_output_embeddings().weight is not llama.get_input_embeddings().weight
