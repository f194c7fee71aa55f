"""A stage's export keeps what users of the base need (issue 18 item 6): every architecture field of the config, the
tokenizer's chat template, the base's generation config, the weights in `export_dtype` (auto = the base's own), and
`max_position_embeddings` raised to the context the stage trained at (RoPE families only).

Two real one-stage runs of a tiny Gemma 3 base (sliding/global layer types, a window shorter than seq_len, an
unusual query_pre_attn_scalar, max_position_embeddings 32 < seq_len 64) saved in bf16: export_dtype auto (bf16
weights) and float32 from a scratch init (the generation config then comes from the base's file, not the weights).
Each export is loaded with plain transformers only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from midtrain.config.load import load_recipe
from midtrain.data import byte_tokenizer
from midtrain.model import build_model, forward_packed
from midtrain.run.context import RunOptions
from midtrain.run.driver import run
from midtrain.run.export import declared_config
from tests.model.families import tiny_config
from tests.train.tiny import write_corpus

VOCAB = 272  # the byte tokenizer's 259 ids, rounded up
BASE_POSITIONS, SEQ_LEN = 32, 64
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# As some published bases ship it: sampling values without do_sample, which transformers loads (with a warning) but
# refuses to save again; the export copies the file as it is.
GENERATION = dict(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, do_sample=False, temperature=0.7, top_p=0.9,
                  top_k=20, max_new_tokens=77, repetition_penalty=1.05)
# What a stage may change in config.json: the declared context, the dtype and bookkeeping.
CHANGED = {"max_position_embeddings", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures",
           "use_cache"}

RECIPE = """\
base: {base}
seed: 0
precision: fp32
{extra}sources:
  - {{name: prose, path: {corpus}/prose.jsonl, holdout_docs: 4}}
  - {{name: math, path: {corpus}/math.jsonl, holdout_docs: 4}}
stages:
  - name: anneal
    init: {init}
    tokens: 1024
    seq_len: {seq_len}
    batch: {{tokens: 512, micro: 4}}
    schedule: {{kind: wsd, peak_lr: 1e-3, warmup_tokens: 256, decay_fraction: 0.5}}
    data: {{mixture: {{prose: 0.5, math: 0.5}}}}
    eval: {{max_docs: 4}}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A bf16 Gemma 3 checkpoint with a chat template and a generation config of its own."""
    root = tmp_path_factory.mktemp("export_keeps")
    write_corpus(root)
    config = tiny_config("gemma3_text", vocab_size=VOCAB, max_position_embeddings=BASE_POSITIONS,
                         query_pre_attn_scalar=12, final_logit_softcapping=20.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    (root / "base/generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "base")
    assert json.loads((root / "base/config.json").read_text())["dtype"] == "bfloat16"
    return root / "base"


def _export(base: Path, name: str, *, init: str = "weights", extra: str = "") -> Path:
    root = base.parent
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(base=base, corpus=root, init=init, seq_len=SEQ_LEN, extra=extra))
    run(load_recipe(recipe, [f"run_dir={root / name}"]), RunOptions(progress=False))
    return root / name / "stages/anneal/hf"


@pytest.fixture(scope="module")
def exports(base, tmp_path_factory) -> dict[str, Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("MIDTRAIN_CACHE", str(base.parent / "cache"))
    try:
        return {"auto": _export(base, "auto"),
                "float32": _export(base, "float32", init="scratch", extra="export_dtype: float32\n")}
    finally:
        mp.undo()


def _weights(export: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in export.glob("*.safetensors"):
        if shard.name != "midtrain_probe.safetensors":
            out.update(load_file(shard))
    return out


@pytest.mark.parametrize("kind", ["auto", "float32"])
def test_config_keeps_every_architecture_field_and_declares_the_trained_context(base, exports, kind):
    want = json.loads((base / "config.json").read_text())
    got = json.loads((exports[kind] / "config.json").read_text())
    assert {k: got.get(k) for k in want if k not in CHANGED} == {k: v for k, v in want.items() if k not in CHANGED}
    assert got["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert (got["sliding_window"], got["query_pre_attn_scalar"], got["final_logit_softcapping"]) == (8, 12, 20.0)
    assert got["max_position_embeddings"] == SEQ_LEN  # max(base 32, seq_len 64)
    plain = AutoConfig.from_pretrained(exports[kind])
    assert type(plain).__name__ == "Gemma3TextConfig" and plain.max_position_embeddings == SEQ_LEN
    assert plain.rope_parameters == AutoConfig.from_pretrained(base).rope_parameters


@pytest.mark.parametrize("kind", ["auto", "float32"])
def test_chat_template_and_generation_config_survive(exports, kind):
    tokenizer = AutoTokenizer.from_pretrained(exports[kind])
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>hi\n<|assistant|>"
    assert json.loads((exports[kind] / "generation_config.json").read_text()) == GENERATION
    generation = GenerationConfig.from_pretrained(exports[kind])
    for key, value in GENERATION.items():
        assert getattr(generation, key) == value, key


def test_auto_dtype_is_the_bases_and_the_probe_holds(exports):
    export = exports["auto"]
    assert {t.dtype for t in _weights(export).values()} == {torch.bfloat16}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    # The round-trip probe was computed from the weights as written (cast to bf16): fp32 logits of the loaded export.
    plain = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    probe = load_file(export / "midtrain_probe.safetensors")
    with torch.no_grad():
        logits = plain(input_ids=probe["input_ids"], use_cache=False).logits.float()
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


def test_float32_export_computes_what_midtrain_trained(exports):
    export = exports["float32"]
    weights = _weights(export)
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"
    plain = AutoModelForCausalLM.from_pretrained(export)
    assert type(plain).__name__ == "Gemma3ForCausalLM"
    assert next(plain.parameters()).dtype == torch.float32
    plain.eval()

    # midtrain's own forward on the stage's final checkpoint (the weights as trained, the config as trained).
    step_dir = max((export.parents[2] / "checkpoints/anneal").glob("step-*"), key=lambda p: int(p.name[5:]))
    trained = build_model(AutoConfig.from_pretrained(export.parents[2].parent / "base"), seed=0)
    missing, unexpected = trained.load_state_dict(load_file(step_dir / "model.safetensors"), strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), (missing, unexpected)
    trained.eval()
    ids = torch.randint(3, 259, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(SEQ_LEN).repeat(2, 1)
    with torch.no_grad():
        ours = forward_packed(trained, {"input_ids": ids, "position_ids": positions}).float()
        theirs = plain(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_learned_positions_and_position_dependent_rope_keep_their_declared_length():
    gpt2 = tiny_config("gpt2", n_positions=32)
    assert declared_config(gpt2, 64).n_positions == 32  # a learned table cannot be declared longer than it is
    llama = tiny_config("llama", max_position_embeddings=32)
    assert declared_config(llama, 64).max_position_embeddings == 64
    assert declared_config(llama, 16).max_position_embeddings == 32  # never lowered
    # Dynamic NTK scales by seq_len / max_position_embeddings: raising it would change the function trained.
    dynamic = tiny_config("llama", max_position_embeddings=32,
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert declared_config(dynamic, 64).max_position_embeddings == 32
