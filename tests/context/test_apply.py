"""apply_rope (method form and raw transformers dicts), HF export + fresh-process reload above L0, validate_rope."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from midtrain.context import RotarySpec, apply_rope, compute, validate_rope
from midtrain.context.rope import ntk_base
from midtrain.model import build_model, preset_config, save_hf_checkpoint
from tests.reload import reload_in_fresh_process

VOCAB = 64
L0 = 64
LENGTH = 200  # above L0: the long-context branch of every method
ROPES = {
    "yarn": {"method": "yarn", "factor": 4, "original_max_position_embeddings": L0, "beta_fast": 4},
    "llama3": {"method": "llama3", "factor": 4, "original_max_position_embeddings": L0},
    "longrope": {
        "method": "longrope",
        "factor": 4,
        "original_max_position_embeddings": L0,
        "short_factor": [1.0 + j / 64 for j in range(32)],
        "long_factor": [1.0 + j / 10 for j in range(32)],
    },
}



def tiny(**overrides):
    return build_model(preset_config("tiny-llama", VOCAB, **overrides), seed=3).eval()


def test_export_and_fresh_reload_give_the_same_logits_above_L0(tmp_path):
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    logits, dirs, configs = {}, {}, {}
    for name, rope in ROPES.items():
        model = tiny()
        plain = model(input_ids=ids).logits.detach()
        apply_rope(model, rope)
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
        assert not torch.allclose(plain, logits[name])  # the remap is live in the model
        dirs[name] = str(save_hf_checkpoint(model, None, tmp_path / name))
        configs[name] = (model.config.rope_parameters, model.config.max_position_embeddings)
    reloaded = reload_in_fresh_process(dirs, ids, tmp_path)
    for name in ROPES:
        assert reloaded[name]["rope_parameters"] == configs[name][0]
        assert reloaded[name]["max_position_embeddings"] == configs[name][1] == 4 * L0
        again = reloaded[name]["logits"]
        assert torch.equal(again, logits[name]), (name, (again - logits[name]).abs().max())


def test_apply_writes_the_export_form_and_rebuilds_rotary():
    model = tiny()
    spec = RotarySpec.from_config(model.config)
    apply_rope(model, ROPES["yarn"])
    assert model.config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4,
        "original_max_position_embeddings": L0,
        "beta_fast": 4,
        "beta_slow": 1,
        "truncate": True,
    }
    assert model.config.max_position_embeddings == 4 * L0
    inv, attn = compute("yarn", spec, {k: v for k, v in ROPES["yarn"].items() if k != "method"})
    for layer_rotary in [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]:
        assert torch.equal(layer_rotary.inv_freq, inv) and layer_rotary.attention_scaling == attn


def test_theta_methods_and_their_composition():
    model = tiny()
    apply_rope(model, {"method": "abf", "rope_theta": "5e5"})  # YAML reads 5e5 as a string
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert model.config.max_position_embeddings == 2048  # not read by default RoPE: unchanged
    apply_rope(model, {"method": "yarn", "factor": 2, "original_max_position_embeddings": 128})
    assert model.config.rope_parameters["rope_theta"] == 5e5  # a chosen theta carries over

    model = tiny()
    ntk = {"method": "ntk", "factor": 4}
    apply_rope(model, ntk)
    theta = ntk_base(1e4, 4, 64)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": theta}
    apply_rope(model, ntk)  # a continued stage repeating the setting: the derived theta does not compound
    assert model.config.rope_parameters["rope_theta"] == theta
    apply_rope(model, {"method": "linear", "factor": 2})  # and the next method starts from the pre-NTK base
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 1e4, "factor": 2}


def test_original_length_is_inherited_from_a_previous_extension():
    model = tiny()
    apply_rope(model, {"method": "yarn", "factor": 4, "original_max_position_embeddings": 256})
    assert validate_rope({"method": "yarn", "factor": 16}, 4096, model.config) == []
    apply_rope(model, {"method": "yarn", "factor": 16})  # 4K -> 32K -> 128K style: L0 stays the pre-training one
    assert model.config.rope_parameters["original_max_position_embeddings"] == 256
    assert model.config.max_position_embeddings == 4096


def _partial_model(model_type):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        partial_rotary_factor=0.5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return build_model(config, seed=0)


def test_partial_rotary_factor_survives_a_replaced_dict():
    model = _partial_model("stablelm")
    spec = RotarySpec.from_config(model.config)
    assert spec.dim == 8
    rope = {"method": "yarn", "factor": 2, "original_max_position_embeddings": 256}
    apply_rope(model, rope)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    inv, _ = compute("yarn", spec, {k: v for k, v in rope.items() if k != "method"})
    assert torch.equal(model.model.rotary_emb.inv_freq, inv)
    model(input_ids=torch.zeros(1, 300, dtype=torch.long))  # shapes still fit


def test_a_family_that_refuses_the_method_leaves_the_model_untouched():
    model = _partial_model("phi3")  # Phi-3's config accepts only default and longrope
    before = (dict(model.config.rope_parameters), model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="phi3"):
        apply_rope(model, {"method": "yarn", "factor": 2, "original_max_position_embeddings": 256})
    assert (model.config.rope_parameters, model.config.max_position_embeddings) == before


def test_raw_transformers_dicts_still_merge():
    model = tiny()
    apply_rope(model, {"rope_type": "linear", "factor": 2.0})
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    apply_rope(model, {"rope_theta": "5e5"})  # same type: merged, factor kept
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
    assert getattr(model.config, "midtrain_rope", None) is None
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        apply_rope(model, {"rope_type": "yarn", "factor": 4.0})  # transformers would use max_pos as L0


def _errors(issues):
    return [m for s, m in issues if s == "error"]


def _warnings(issues):
    return [m for s, m in issues if s == "warning"]


@pytest.fixture(scope="module")
def base_config():
    return preset_config("tiny-llama", VOCAB)


def test_validate_names_the_bad_key(base_config):
    issues = validate_rope(
        {"method": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fats": 8}, 512, base_config
    )
    assert _errors(issues) == [m for m in _errors(issues) if m.startswith("rope.beta_fats:")] and _errors(issues)
    assert _errors(validate_rope({"method": "yarm", "factor": 4}, 512, base_config))[0].startswith("rope.method:")
    assert "rope.factor" in _errors(validate_rope({"method": "linear", "factor": "four"}, 512, base_config))[0]
    assert _errors(validate_rope({"method": "linear"}, 512, base_config))[0].startswith("rope.factor:")
    assert _errors(validate_rope({"method": "abf"}, 512, base_config))[0].startswith("rope.rope_theta:")
    assert _errors(validate_rope({"method": "linear", "factor": 0.5}, 512, base_config))
    assert _errors(validate_rope({"method": "yarn", "rope_type": "yarn"}, 512, base_config))
    assert _errors(
        validate_rope(
            {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta": 1}, 512, base_config
        )
    )[0].startswith("rope.beta:")
    assert _errors(validate_rope({"rope_type": "nope"}, 512, base_config))


@pytest.mark.parametrize("method", ["yarn", "llama3", "longrope"])
def test_validate_requires_the_original_length(method, base_config):
    rope = {"method": method, "factor": 4}
    if method == "longrope":
        rope |= {"short_factor": [1.0] * 32, "long_factor": [2.0] * 32}
    errors = _errors(validate_rope(rope, 512, base_config))
    assert errors and errors[0].startswith("rope.original_max_position_embeddings:")
    assert not _errors(validate_rope({**rope, "original_max_position_embeddings": 128}, 512, base_config))


def test_validate_training_and_length_checks(base_config):
    dyn = {"method": "dynamic", "factor": 4}
    assert "inference-only" in _errors(validate_rope(dyn, 512, base_config))[0]
    assert not _errors(validate_rope(dyn, 512, base_config, training=False))
    ok = {"method": "yarn", "factor": 4, "original_max_position_embeddings": 256}
    assert validate_rope(ok, 1024, base_config) == []
    assert "seq_len 512" in _warnings(validate_rope(ok, 512, base_config))[0]  # factor vs seq_len / L0
    assert _errors(validate_rope({**ok, "beta_fast": 0}, 1024, base_config))[0].startswith("rope.beta_fast:")
    short = {"method": "yarn", "factor": 4, "original_max_position_embeddings": 128}
    assert any(m.startswith("rope.beta_fast:") for m in _warnings(validate_rope(short, 512, base_config)))
    assert validate_rope({**short, "beta_fast": 4}, 512, base_config) == []
    lr = {
        "method": "longrope",
        "factor": 4,
        "original_max_position_embeddings": 128,
        "short_factor": [1.0] * 32,
        "long_factor": [2.0] * 32,
    }
    assert "short factors" in _errors(validate_rope(lr, 128, base_config))[0]
    assert any("shorter than L0" in m for m in _warnings(validate_rope(lr, 512, base_config)))
    assert "d/2 = 32" in _errors(validate_rope({**lr, "long_factor": [2.0] * 16}, 512, base_config))[0]
    assert validate_rope({"method": "abf", "rope_theta": 5e5}, 4096, base_config) == []
    assert validate_rope(None, 512, base_config) == []
