"""Every family in tests/model/families.py mid-trains end to end and trains the function its export computes.

Per family: a packed forward equals each document run alone through plain transformers (the oracle for document
masks, windows, chunks, sinks and recurrent state); a two-stage run (WSD anneal on a two-source mix, then a YaRN x2
extension where the family has RoPE) whose export plain transformers loads as the same class, with every
architecture field kept and the logits midtrain computed; and recipe check refusing a RoPE setting the family cannot
take, before any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from midtrain.config.load import load_recipe
from midtrain.context.methods import RECORD
from midtrain.data import byte_tokenizer
from midtrain.model import forward_packed
from midtrain.model.families import choose_attention, packing_mode
from midtrain.run.context import RunOptions
from midtrain.run.driver import run
from tests.model.families import FAMILIES, VOCAB, tiny_config
from tests.train.tiny import midtrain, write_corpus

NO_ROPE = {"gpt2"}
RUN_VOCAB = 272  # the byte tokenizer's 259 ids, rounded up
# Config keys a stage may change: the RoPE it trained with, the context it declares, and bookkeeping.
CHANGED_BY_A_STAGE = {"rope_parameters", "max_position_embeddings", "n_positions", RECORD, "dtype", "torch_dtype",
                      "transformers_version", "_name_or_path", "architectures"}

RECIPE = """\
base: {base}
seed: 3
precision: fp32
sources:
  - {{name: prose, path: {corpus}/prose.jsonl, domain: general, holdout_docs: 4}}
  - {{name: math, path: {corpus}/math.jsonl, holdout_docs: 4}}
stages:
  - name: anneal
    tokens: 1024
    seq_len: 64
    batch: {{tokens: 512, micro: 4}}
    schedule: {{kind: wsd, peak_lr: 1e-3, warmup_tokens: 256, decay_fraction: 0.5, min_lr: 1e-4}}
    data: {{mixture: {{prose: 0.5, math: 0.5}}}}
    eval: {{max_docs: 4}}
  - name: extend
    start_lr: from_previous
    tokens: 1024
    seq_len: 128
    batch: {{tokens: 512, micro: 4}}
{rope}    schedule: {{kind: wsd, decay_fraction: 1.0, min_lr: 0}}
    data: {{mixture: {{prose: 0.3, math: 0.7}}}}
    eval: {{max_docs: 4}}
"""
YARN = "    rope: {method: yarn, factor: 2, original_max_position_embeddings: 64, beta_fast: 2, beta_slow: 1}\n"
LINEAR = "    rope: {method: linear, factor: 2}\n"
LONGROPE = ("    rope: {method: longrope, original_max_position_embeddings: 64, short_factor: [1, 1, 1, 1, 1, 1, 1, 1], "
            "long_factor: [1, 1.2, 1.4, 1.6, 1.8, 2, 2, 2]}\n")
# The extension each family takes: YaRN, except where transformers' config for the family accepts less (Phi-3:
# longrope only; Gemma 4's global layers: proportional RoPE, extended by its linear factor).
EXTENSION = {"phi3": (LONGROPE, "longrope"), "gemma4_text": (LINEAR, "proportional")}


def write_base(model_type: str, root: Path, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
               **overrides) -> Path:
    """A local HF checkpoint of the family (random weights) with the byte tokenizer, as `save_pretrained` writes."""
    if model_type in NO_ROPE:
        config = tiny_config(model_type, vocab_size=RUN_VOCAB, n_positions=128, **overrides)
    else:
        config = tiny_config(model_type, vocab_size=RUN_VOCAB, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype)
    base = root / "base"
    model.save_pretrained(base, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_tokenizer().save_pretrained(base)
    return base


def write_family_recipe(root: Path, base: Path, corpus: Path, rope: str) -> Path:
    path = root / "recipe.yaml"
    path.write_text(RECIPE.format(base=base, corpus=corpus, rope=rope))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_packed_forward_equals_each_document_alone(model_type):
    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=choose_attention(config).implementation,
                                             dtype=torch.float32).eval()
    lengths = [[20, 30, 14], [40, 24]]  # every document longer than the families' windows and chunks
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = forward_packed(model, {"input_ids": ids, "position_ids": positions})
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(input_ids=ids[r:r + 1, start:start + n], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, rtol=0, atol=1e-5,
                                           msg=lambda m: f"{model_type} ({packing_mode(config, 64)}): {m}")
                start += n


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_two_stage_run_exports_what_it_trained(model_type, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(corpus / "cache"))  # one tokenization for every family
    base = write_base(model_type, tmp_path)
    rope, rope_type = EXTENSION.get(model_type, (YARN, "yarn"))
    recipe = write_family_recipe(tmp_path, base, corpus, "" if model_type in NO_ROPE else rope)
    run(load_recipe(recipe, [f"run_dir={tmp_path / 'run'}"]), RunOptions(progress=False))

    export = tmp_path / "run/stages/extend/hf"
    for stage in ("anneal", "extend"):
        metrics = json.loads((tmp_path / f"run/eval/{stage}.json").read_text())["metrics"]
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float)), metrics
    base_config = json.loads((base / "config.json").read_text())
    exported_config = json.loads((export / "config.json").read_text())
    kept = {k: v for k, v in base_config.items() if k not in CHANGED_BY_A_STAGE}
    assert {k: exported_config.get(k) for k in kept} == kept

    # Plain transformers loads the same class and computes the logits midtrain recorded at export.
    plain = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert type(plain).__name__ == type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))).__name__
    probe = load_file(export / "midtrain_probe.safetensors")
    with torch.no_grad():
        logits = plain(input_ids=probe["input_ids"], use_cache=False).logits.float()
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)

    if model_type in NO_ROPE:
        return
    rope = plain.config.rope_parameters
    touched = [rope] if "rope_type" in rope else [rope[t] for t in rope if t != "sliding_attention"]
    assert touched and all(p["rope_type"] == rope_type for p in touched), rope
    if rope_type != "longrope":
        assert all(p["factor"] == 2 for p in touched), rope
    if "sliding_attention" in rope:  # local layers keep their base (Gemma 3's published practice)
        base_rope = AutoConfig.from_pretrained(base).rope_parameters["sliding_attention"]
        assert rope["sliding_attention"] == base_rope


@pytest.mark.parametrize(("model_type", "rope", "says"), [
    ("phi3", YARN, "'phi3' config refuses it"),
    ("gpt2", YARN, "no rotary position embedding"),
    ("gemma4_text", YARN, "proportional RoPE"),
    ("gemma3_text", YARN.replace("beta_slow: 1}", "beta_slow: 1, layer_types: [global]}"), "no layer type 'global'"),
])
def test_recipe_check_refuses_a_rope_setting_the_family_cannot_take(model_type, rope, says, corpus, tmp_path):
    base = write_base(model_type, tmp_path)
    recipe = write_family_recipe(tmp_path, base, corpus, rope)
    result = midtrain("recipe", "check", str(recipe), "--set", f"run_dir={tmp_path / 'run'}",
                      cache=corpus / "cache", check=False)
    assert result.returncode != 0
    assert says in result.stdout + result.stderr and "stages.extend.rope" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run/stages").exists()  # refused before any training


def test_a_sharded_bf16_base_trains_and_exports_in_its_own_dtype(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(corpus / "cache"))
    base = write_base("qwen3_moe", tmp_path, dtype=torch.bfloat16, max_shard_size="100KB")
    assert len(list(base.glob("model-*.safetensors"))) > 1 and (base / "model.safetensors.index.json").is_file()
    recipe = write_family_recipe(tmp_path, base, corpus, YARN)
    run(load_recipe(recipe, [f"run_dir={tmp_path / 'run'}"]), RunOptions(progress=False))
    export = tmp_path / "run/stages/extend/hf"
    weights = {}
    for shard in export.glob("*.safetensors"):
        if shard.name != "midtrain_probe.safetensors":
            weights.update(load_file(shard))
    assert weights and {t.dtype for t in weights.values()} == {torch.bfloat16}  # export_dtype: auto = the base's
    plain = AutoModelForCausalLM.from_pretrained(export)
    assert type(plain).__name__ == "Qwen3MoeForCausalLM"


def test_the_support_table_covers_every_family():
    """docs/MODELS.md is written by scripts/family_support.py from these tests; a family added here needs a row."""
    table = (Path(__file__).resolve().parents[2] / "docs" / "MODELS.md").read_text()
    assert [f for f in FAMILIES if f"| `{f}` |" not in table] == []


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_fsdp_finds_every_decoder_layer(model_type):
    """FSDP2 shards the family's own repeated block one by one (GPT2Block, GPTNeoXLayer, *DecoderLayer)."""
    from midtrain.train.distributed import decoder_layers

    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert not any(a is not b and any(m is b for m in a.modules()) for a in layers for b in layers)  # disjoint
