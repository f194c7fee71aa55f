"""Checks of a recipe against its base checkpoint: a damaged or inconsistent base is one error line naming the file
(at `recipe check` and at `run`, no traceback), custom code only by the recipe's opt-in, and what the family offers
(attention implementations, layer types midtrain knows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from midtrain.config import load_recipe
from midtrain.model import load_model
from midtrain.model.verify import CheckpointFileError
from midtrain.plan import build_plan
from midtrain.run import preflight

from ..train.tiny import midtrain, write_recipe

WORDS = "the a model data token learns stage mixture anneal context long short".split()
CUSTOM_CODE = """from transformers import LlamaForCausalLM


class CustomForCausalLM(LlamaForCausalLM):
    pass
"""


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")  # 16 tokens


def _save_base(directory: Path, config, **save_kw) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, **save_kw)
    _tokenizer().save_pretrained(directory)
    return directory


def _llama_base(directory: Path, **overrides) -> Path:
    kw = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return _save_base(directory, LlamaConfig(**{**kw, **overrides}))


def _edit_config(base: Path, **changes) -> None:
    path = base / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _check(tmp_path: Path, base: Path, *overrides: str, command: tuple[str, ...] = ("recipe", "check")):
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        write_recipe(tmp_path)
    args = ("--set", f"base={base}", "--set", "tokenizer=null", "--set", f"run_dir={tmp_path / 'run'}")
    for override in overrides:
        args += ("--set", override)
    return midtrain(*command, str(recipe), *args, cache=tmp_path / "cache", check=False)


def _one_error(result, *, code: int, names: Path | str) -> str:
    """The command failed with `code`, printed exactly one `error:` line, naming `names`, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(names) in errors[0], errors[0]
    return errors[0]


def test_a_truncated_safetensors_file_is_one_line_at_check_and_at_run(tmp_path):
    base = _llama_base(tmp_path / "base")
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    line = _one_error(_check(tmp_path, base), code=2, names=weights)
    assert "base:" in line and "truncated" in line
    line = _one_error(_check(tmp_path, base, command=("run",)), code=1, names=weights)
    assert "truncated" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(CheckpointFileError, match="model.safetensors: truncated"):
        load_model(base)


def test_a_damaged_safetensors_header_is_one_line(tmp_path):
    base = _llama_base(tmp_path / "base")
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"  # the JSON header no longer parses
    weights.write_bytes(bytes(data))
    assert "damaged safetensors header" in _one_error(_check(tmp_path, base), code=2, names=weights)


def test_a_missing_shard_is_one_line(tmp_path):
    base = tmp_path / "base"
    _save_base(base, LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
               max_shard_size="30KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1 and (base / "model.safetensors.index.json").is_file()
    shards[-1].unlink()
    line = _one_error(_check(tmp_path, base), code=2, names=shards[-1])
    assert "missing" in line and "model.safetensors.index.json" in line
    with pytest.raises(CheckpointFileError, match=shards[-1].name):
        load_model(base)


@pytest.mark.parametrize("damage, says", [
    ("invalid-json", "not valid JSON"),
    ("no-model-type", "no model_type"),
    ("unknown-model-type", "unknown model_type 'llama-from-the-future'"),
])
def test_a_bad_config_json_is_one_line_naming_it(tmp_path, damage, says):
    base = _llama_base(tmp_path / "base")
    if damage == "invalid-json":
        (base / "config.json").write_text('{"model_type": "llama", "vocab_size": 32,')
    else:
        _edit_config(base, model_type=None if damage == "no-model-type" else "llama-from-the-future")
    line = _one_error(_check(tmp_path, base), code=2, names=base / "config.json")
    assert says in line
    with pytest.raises(CheckpointFileError, match="config.json: " + says.split(" '")[0]):
        load_model(base)


def test_a_config_field_transformers_refuses_is_one_line(tmp_path):
    base = _llama_base(tmp_path / "base")
    _edit_config(base, layer_types=["full_attention", "no_such_attention"])  # transformers validates layer_types
    line = _one_error(_check(tmp_path, base), code=2, names=base / "config.json")
    assert "transformers cannot read it" in line
    with pytest.raises(CheckpointFileError, match="transformers cannot load this checkpoint"):
        load_model(base)


def test_a_vocab_size_that_does_not_match_the_embedding_names_both_numbers(tmp_path):
    base = _llama_base(tmp_path / "base")
    _edit_config(base, vocab_size=40)
    line = _one_error(_check(tmp_path, base), code=2, names=base / "config.json")
    assert "vocab_size 40" in line and "model.safetensors has an embedding of 32 rows" in line
    with pytest.raises(CheckpointFileError, match="vocab_size 40 but model.safetensors has an embedding of 32"):
        load_model(base)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    base = _llama_base(tmp_path / "base", vocab_size=8)  # the tokenizer has 16 tokens
    line = _one_error(_check(tmp_path, base), code=2, names=f"{base}/config.json")
    assert "tokenizer: 16 tokens but the base's embedding has 8 rows" in line


def test_recipe_special_tokens_do_not_count_against_the_embedding(tmp_path):
    """special_tokens grow the embedding at load: only the base tokenizer itself must fit."""
    base = _llama_base(tmp_path / "base", vocab_size=16)  # exactly the tokenizer
    recipe = load_recipe(write_recipe(tmp_path), [f"base={base}", "tokenizer=null", f"run_dir={tmp_path / 'run'}",
                                                 "special_tokens=[<|a|>, <|b|>]"])
    checks = preflight(recipe, build_plan(recipe))
    assert checks.problems == [], checks.problems


def _custom_code_base(directory: Path) -> Path:
    base = _llama_base(directory)
    (base / "modeling_custom.py").write_text(CUSTOM_CODE)
    _edit_config(base, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    return base


def test_custom_code_is_refused_without_the_recipes_opt_in(tmp_path):
    base = _custom_code_base(tmp_path / "base")
    line = _one_error(_check(tmp_path, base), code=2, names=base / "config.json")
    assert "trust_remote_code:" in line and "auto_map" in line and "trust_remote_code: true" in line
    with pytest.raises(CheckpointFileError, match="custom code"):
        load_model(base)


def test_custom_code_runs_with_the_opt_in(tmp_path):
    base = _custom_code_base(tmp_path / "base")
    result = _check(tmp_path, base, "trust_remote_code=true")
    assert result.returncode == 0, result.stderr
    model = load_model(base, trust_remote_code=True)  # forwarded to from_pretrained: the repository's class
    assert type(model).__name__ == "CustomForCausalLM"


def test_unknown_layer_types_are_a_warning_not_an_error(tmp_path):
    base = _llama_base(tmp_path / "base", layer_types=["full_attention", "indexed_attention"])
    result = _check(tmp_path, base)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())  # the console wraps long lines
    assert ("warning: the base has layer types midtrain does not know (indexed_attention): midtrain trains one "
            "document per row for this model") in out and "slower than packing" in out


def test_an_attention_the_family_does_not_offer_is_an_error_on_attention(tmp_path):
    from tests.model.families import tiny_config

    base = _save_base(tmp_path / "base", tiny_config("gemma2", bos_token_id=1, eos_token_id=2, pad_token_id=3))
    line = _one_error(_check(tmp_path, base, "attention=sdpa"), code=2, names="attention:")
    assert "Gemma2ForCausalLM does not offer attention 'sdpa'" in line
    recipe = load_recipe(tmp_path / "recipe.yaml", [f"base={base}", "tokenizer=null", f"run_dir={tmp_path / 'run'}",
                                                    "attention=sdpa"])
    assert [p.field for p in preflight(recipe, build_plan(recipe)).problems] == ["attention"]
    assert _check(tmp_path, base).returncode == 0  # auto picks what Gemma 2 offers
