"""Per-layer-type RoPE (Gemma 3, OLMo 3): an extension remaps the global layers by default, each type from its own
base; the oracle is a transformers model built from rope_parameters written by hand as transformers documents them."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from midtrain.context.apply import apply_rope
from midtrain.context.checks import config_rope_issues

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"] * 2)


def tiny(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON), dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo3"])
def test_global_layers_are_remapped_and_match_a_hand_written_config(model_type):
    model = tiny(model_type)
    base = copy.deepcopy(model.config.rope_parameters)
    apply_rope(model, {"method": "linear", "factor": 8})  # Gemma 3's published extension
    hand = copy.deepcopy(model.config.to_dict())
    hand["rope_parameters"] = {"sliding_attention": base["sliding_attention"],
                               "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                  "rope_theta": base["full_attention"]["rope_theta"]}}
    hand.pop("midtrain_rope", None)
    oracle = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{
        k: v for k, v in hand.items() if k not in ("model_type", "transformers_version")}), dtype=torch.float32)
    oracle.load_state_dict(model.state_dict())
    oracle.eval()
    assert model.config.rope_parameters["sliding_attention"] == base["sliding_attention"]  # local layers keep theirs
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, oracle(input_ids=ids).logits, rtol=0, atol=1e-5)
        untouched = tiny(model_type)(input_ids=ids).logits
    assert (model(input_ids=ids).logits - untouched).abs().max() > 1e-3  # the remap did change the model


def test_layer_types_chooses_what_is_remapped_and_unknown_types_are_named():
    model = tiny("gemma3_text")
    apply_rope(model, {"method": "abf", "rope_theta": 5e4, "layer_types": ["sliding_attention"]})
    assert model.config.rope_parameters["sliding_attention"]["rope_theta"] == 5e4
    assert model.config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    issues = config_rope_issues({"method": "linear", "factor": 2, "layer_types": ["global"]}, model.config)
    assert [str(i) for i in issues] == ["rope.layer_types: no layer type 'global' in this 'gemma3_text' model "
                                        "(it has: sliding_attention, full_attention)"]


def test_layer_types_on_a_single_rope_model_is_an_error():
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, num_attention_heads=2)
    issues = config_rope_issues({"method": "linear", "factor": 2, "layer_types": ["full_attention"]}, config)
    assert issues and "sets one RoPE for all layers" in issues[0].message


def test_model_rope_fields_are_kept_and_a_replaced_base_remap_is_said():
    config = AutoConfig.for_model("gpt_oss", vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=16,
                                  num_local_experts=2)
    assert config.rope_parameters["truncate"] is False
    issues = config_rope_issues({"method": "yarn", "factor": 2, "original_max_position_embeddings": 4096}, config)
    assert [i.severity for i in issues] == ["warning"] and "replaces it" in issues[0].message
    from midtrain.context.remap import remap_rope

    assert remap_rope(config, {"method": "yarn", "factor": 2,
                               "original_max_position_embeddings": 4096}).rope_parameters["truncate"] is False


def test_rope_show_reads_each_layer_type_of_a_checkpoint(tmp_path):
    tiny("gemma3_text").save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "midtrain", "rope", "show", "--method", "linear", "--factor", "2",
                          "--checkpoint", str(tmp_path), "--original", "64", "--layer-type", "sliding_attention"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "layer type sliding_attention: {'rope_theta': 10000.0, 'rope_type': 'default'}  <- shown" in out.stdout
    assert "base 10000" in out.stdout
