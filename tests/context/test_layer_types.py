"""Per-layer-type RoPE (Gemma 3, OLMo 3): an extension remaps the global layers by default, each type from its own
base; the oracle is a transformers model built from rope_parameters written by hand as transformers documents them."""

from __future__ import annotations

import copy

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
    from typer.testing import CliRunner

    from midtrain.cli import app

    tiny("gemma3_text").save_pretrained(tmp_path)
    args = ["rope", "show", "--method", "linear", "--factor", "2", "--checkpoint", str(tmp_path), "--original", "64"]
    out = CliRunner().invoke(app, args).output
    full = "layer type full_attention: rope_type default, rope_theta 1e+06 (an extension remaps it by default)"
    sliding = "layer type sliding_attention: rope_type default, rope_theta 10000 (an extension leaves it"
    assert full in out and sliding in out, out
    assert "base 1e+06, L0 64, target 128, factor 2" in out and "[linear]" in out  # the global layers, remapped
    assert "base 10000, L0 64, target 128" in out and "[default]" in out  # the local ones as they stay
    result = CliRunner().invoke(app, [*args, "--layer-type", "sliding_attention"])
    assert result.exit_code == 0, result.output
    assert "layer type sliding_attention: rope_type default, rope_theta 10000 (shown with the method" in result.output
    assert "base 10000, L0 64" in result.output and "base 1e+06" not in result.output
    result = CliRunner().invoke(app, [*args, "--layer-type", "global"])
    assert result.exit_code == 2 and "no such layer type" in result.output and "sliding_attention" in result.output


def _rotary(model):
    return model.model.rotary_emb


def _oracle(model_type: str, rope_parameters: dict, **overrides):
    """A fresh transformers model whose rope_parameters are written by hand, as transformers documents them."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides, "rope_parameters": rope_parameters})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo3"])
@pytest.mark.parametrize("rope", [{"method": "linear", "factor": 8},
                                  {"method": "yarn", "factor": 4, "original_max_position_embeddings": 64}])
def test_each_layer_type_computes_what_transformers_computes(model_type, rope):
    """inv_freq and attention scaling per layer type against the hand-written oracle; the local layers keep theirs."""
    model = tiny(model_type)
    base = copy.deepcopy(model.config.rope_parameters)
    before = {n: b.clone() for n, b in _rotary(model).named_buffers()}
    apply_rope(model, rope)
    theta = base["full_attention"]["rope_theta"]
    if rope["method"] == "linear":
        hand = {"rope_type": "linear", "factor": 8.0, "rope_theta": theta}
        length = 64
    else:
        hand = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": theta}
        length = 256
    oracle = _oracle(model_type, {"sliding_attention": base["sliding_attention"], "full_attention": hand},
                     max_position_embeddings=length)
    mine, theirs = _rotary(model), _rotary(oracle)
    assert torch.equal(mine.full_attention_inv_freq, theirs.full_attention_inv_freq)
    assert mine.full_attention_attention_scaling == theirs.full_attention_attention_scaling
    if rope["method"] == "yarn":
        assert mine.full_attention_attention_scaling > 1  # 0.1 ln 4 + 1: the yarn temperature is there
    assert torch.equal(mine.sliding_attention_inv_freq, before["sliding_attention_inv_freq"])
    assert mine.sliding_attention_attention_scaling == 1.0
    assert model.config.max_position_embeddings == length
    oracle.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, oracle(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_save_and_load_round_trip_keeps_the_per_layer_rope(tmp_path):
    model = tiny("gemma3_text")
    apply_rope(model, {"method": "linear", "factor": 8})
    written = copy.deepcopy(model.config.rope_parameters)
    assert model.config.midtrain_rope["layer_types"] == ["full_attention"]  # provenance: what was touched
    assert model.config.midtrain_rope["base_rope_theta"] == {"full_attention": 1e6}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.rope_parameters == written
    assert loaded.config.midtrain_rope["layer_types"] == ["full_attention"]
    assert torch.equal(_rotary(loaded).full_attention_inv_freq, _rotary(model).full_attention_inv_freq)
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    # continuing from the export: the next stage remaps from the recorded base again, and is told so
    assert not any(i.severity == "error" for i in config_rope_issues({"method": "linear", "factor": 4},
                                                                     loaded.config))


def test_explicit_layer_types_and_raw_dicts_per_layer_type():
    model = tiny("olmo3")
    apply_rope(model, {"method": "linear", "factor": 2, "layer_types": ["full_attention", "sliding_attention"]})
    assert {t: p["rope_type"] for t, p in model.config.rope_parameters.items()} == {
        "sliding_attention": "linear", "full_attention": "linear"}
    assert model.config.midtrain_rope["layer_types"] == ["full_attention", "sliding_attention"]
    model = tiny("gemma3_text")
    apply_rope(model, {"rope_type": "linear", "factor": 4.0})  # a transformers dict merges into each touched type
    assert model.config.rope_parameters["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}
    assert model.config.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert model.config.midtrain_rope["layer_types"] == ["full_attention"]


def test_a_model_whose_layers_are_all_windowed_must_name_the_types():
    config = AutoConfig.for_model("gemma3_text", **{**COMMON, "layer_types": ["sliding_attention"] * 4})
    issues = config_rope_issues({"method": "linear", "factor": 2}, config)
    assert [i.path for i in issues] == [("rope", "layer_types")] and "windowed" in issues[0].message
    assert not config_rope_issues({"method": "linear", "factor": 2, "layer_types": ["sliding_attention"]}, config)


def test_a_layer_type_set_to_none_is_kept():
    from midtrain.context.remap import remap_rope

    config = AutoConfig.for_model("gemma3_text", **COMMON)
    config.rope_parameters = {**config.rope_parameters, "sliding_attention": None}  # NoPE local layers
    assert not config_rope_issues({"method": "linear", "factor": 2}, config)
    rp = remap_rope(config, {"method": "linear", "factor": 2}).rope_parameters
    assert rp["sliding_attention"] is None and rp["full_attention"]["factor"] == 2
    issues = config_rope_issues({"method": "linear", "factor": 2, "layer_types": ["sliding_attention"]}, config)
    assert [i.path for i in issues] == [("rope", "layer_types")] and "has no RoPE" in issues[0].message


def _ministral3():
    import transformers

    if not hasattr(transformers, "Ministral3Config"):
        pytest.skip("no Ministral3Config in this transformers")
    return transformers.Ministral3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def test_ministral3_keeps_llama_4_scaling_beta_and_its_yarn_fields():
    from midtrain.context.remap import remap_rope

    config = _ministral3()
    base = config.rope_parameters
    yarn = remap_rope(config, {"method": "yarn", "factor": 32, "original_max_position_embeddings": 16384})
    rp = yarn.rope_parameters
    assert rp["llama_4_scaling_beta"] == base["llama_4_scaling_beta"]
    assert (rp["mscale"], rp["mscale_all_dim"]) == (base["mscale"], base["mscale_all_dim"])  # the model's, kept
    assert rp["factor"] == 32 and rp["max_position_embeddings"] == 32 * 16384 == yarn.max_position_embeddings
    linear = remap_rope(config, {"method": "linear", "factor": 2}).rope_parameters
    assert linear["llama_4_scaling_beta"] == base["llama_4_scaling_beta"]
    assert not {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "type"} & set(linear)  # yarn's went with it
    issues = config_rope_issues({"method": "linear", "factor": 2}, config)
    assert [i.severity for i in issues] == ["warning"] and "replaces it" in issues[0].message


def test_gpt_oss_truncate_survives_an_applied_yarn_stage():
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                 layer_types=["sliding_attention", "full_attention"])
    config = AutoConfig.for_model("gpt_oss", **shape)
    hand = {**copy.deepcopy(config.rope_parameters), "factor": 8.0}  # gpt-oss: yarn, truncate false
    assert hand["truncate"] is False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    apply_rope(model, {"method": "yarn", "factor": 8, "original_max_position_embeddings": 4096})
    assert model.config.rope_parameters["truncate"] is False
    assert model.config.rope_parameters["factor"] == 8
    oracle = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt_oss", **shape, rope_parameters=hand, max_position_embeddings=8 * 4096),
        dtype=torch.float32)
    assert torch.equal(model.model.rotary_emb.inv_freq, oracle.model.rotary_emb.inv_freq)
    truncated = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", **shape, rope_parameters={**hand, "truncate": True}, max_position_embeddings=8 * 4096))
    assert not torch.equal(model.model.rotary_emb.inv_freq, truncated.model.rotary_emb.inv_freq)  # it matters
    assert model.model.rotary_emb.attention_scaling == oracle.model.rotary_emb.attention_scaling


def _stages(*stages):
    from types import SimpleNamespace

    from midtrain.context.setting import parse_rope

    return [SimpleNamespace(name=f"s{i}", rope=parse_rope(rope), seq_len=seq_len)
            for i, (rope, seq_len) in enumerate(stages)]


def test_stage_checks_against_the_base():
    from midtrain.context.checks import stage_rope_issues

    phi3 = AutoConfig.for_model("phi3", vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                max_position_embeddings=4096)
    errors, _ = stage_rope_issues(_stages(({"method": "yarn", "factor": 2,
                                            "original_max_position_embeddings": 4096}, 8192)), phi3)
    assert [p for p, _ in errors] == [("stages", 0, "rope", "method")] and "'phi3' config refuses" in errors[0][1]
    assert stage_rope_issues(_stages(({"method": "yarn", "factor": 2}, 8192)))[0]  # L0 missing: without a base too

    gpt2 = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=1024)
    errors, _ = stage_rope_issues(_stages(({"method": "linear", "factor": 2}, 512)), gpt2, by_name=True)
    assert errors == [(("stages", "s0", "rope"), "model type 'gpt2' has no rotary position embedding (it learns "
                                                  "absolute positions); a rope setting cannot apply to it")]
    errors, _ = stage_rope_issues(_stages((None, 1024), (None, 2048)), gpt2)
    assert [p for p, _ in errors] == [("stages", 1, "seq_len")] and "beyond the 1024 positions" in errors[0][1]

    llama3 = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, num_attention_heads=2,
                                  max_position_embeddings=131072, rope_parameters={
                                      "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    errors, warnings = stage_rope_issues(_stages(({"method": "yarn", "factor": 32,
                                                   "original_max_position_embeddings": 8192}, 262144)), llama3)
    assert not errors
    assert warnings == ["stage 's0': rope.method: the base already uses llama3 (factor 8, "
                        "original_max_position_embeddings 8192) scaling; this stage's yarn replaces it (computed from "
                        "rope_theta 500000), it does not compose on top of it"]

    gemma = AutoConfig.for_model("gemma3_text", **COMMON)  # max_position_embeddings 64
    errors, warnings = stage_rope_issues(_stages((None, 128), ({"method": "linear", "factor": 2}, 128)), gemma)
    assert not errors and len(warnings) == 2 and all("beyond the 64 positions" in w for w in warnings)
    _, warnings = stage_rope_issues(_stages(({"method": "yarn", "factor": 2,
                                              "original_max_position_embeddings": 64}, 128)), gemma)
    assert not any("beyond" in w for w in warnings)  # yarn declares s x L0 = 128
