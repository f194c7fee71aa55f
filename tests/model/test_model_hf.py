"""HF I/O: seeded init, export/reload bit-exactness in a fresh process, atomic export, clear load errors."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from midtrain.model import build_model, load_model, load_tokenizer, preset_config, save_hf_checkpoint
from tests.reload import reload_in_fresh_process

VOCAB = 96
WORDS = "the cat sat on a mat and then it ran far away".split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0, "original_max_position_embeddings": 128}

# name -> (config, whether its RoPE is non-default: then reloading with default RoPE must change the logits)
CASES = {
    "llama": (lambda: preset_config("tiny-llama", VOCAB, bos_token_id=1, eos_token_id=2), False),
    "qwen2-tied": (lambda: preset_config("tiny-qwen2", VOCAB), False),
    "llama-yarn": (lambda: preset_config("tiny-llama", VOCAB, rope_parameters=YARN, max_position_embeddings=512),
                   True),
    "qwen2-linear": (lambda: preset_config("tiny-qwen2", VOCAB,
                                           rope_parameters={"rope_type": "linear", "factor": 2.0}), True),
    "qwen3": (lambda: AutoConfig.for_model("qwen3", head_dim=16, **_SMALL), False),
    "mistral": (lambda: AutoConfig.for_model("mistral", head_dim=16, **_SMALL), False),
    # Llama/Qwen2/Qwen3/Mistral ignore partial_rotary_factor in transformers 5.23; Phi-3 applies it.
    "phi3-partial": (lambda: AutoConfig.for_model("phi3", partial_rotary_factor=0.5, **_SMALL), True),
}



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every case, then reload them all in ONE fresh interpreter (the slow part)."""
    root = tmp_path_factory.mktemp("export")
    ids = torch.randint(4, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    tokenizer = make_tokenizer()
    results, dirs = {}, {}
    for name, (make_config, _) in CASES.items():
        model = build_model(make_config(), seed=1).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        out = save_hf_checkpoint(model, tokenizer, root / name, extra={"stage": name, "step": 7})
        results[name] = {"model": model, "logits": logits, "dir": out}
        dirs[name] = str(out)
    reloaded = reload_in_fresh_process(dirs, ids, root)
    for name in CASES:
        results[name]["reloaded"] = reloaded[name]
        results[name]["reloaded_logits"] = reloaded[name]["logits"]
    return ids, results


@pytest.mark.parametrize("name", list(CASES))
def test_export_reloads_bit_exact_in_fresh_process(exported, name):
    ids, results = exported
    r = results[name]
    assert torch.equal(r["reloaded_logits"], r["logits"])
    saved = json.loads((r["dir"] / "config.json").read_text())
    assert saved["rope_parameters"] == r["model"].config.rope_parameters
    assert r["reloaded"]["rope_parameters"] == saved["rope_parameters"]
    assert r["reloaded"]["dtype"] == "torch.float32" and saved["dtype"] == "float32"
    assert r["reloaded"]["use_cache"] is True  # exported for generation ...
    assert r["model"].config.use_cache is False  # ... while the training model keeps its setting
    assert json.loads((r["dir"] / "midtrain.json").read_text()) == {"stage": name, "step": 7}
    assert (r["dir"] / "generation_config.json").is_file() and (r["dir"] / "model.safetensors").is_file()


def test_exported_rope_is_what_it_claims(exported):
    _, results = exported
    assert results["llama-yarn"]["reloaded"]["rope_parameters"] == {**YARN}
    assert results["qwen2-linear"]["reloaded"]["rope_parameters"]["rope_theta"] == 1000000.0
    assert results["phi3-partial"]["reloaded"]["rope_parameters"]["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("name", [n for n, (_, nondefault) in CASES.items() if nondefault])
def test_rope_parameters_matter(exported, name):
    """Control: the same weights with default full RoPE give other logits, so exact reload proves RoPE survived."""
    ids, results = exported
    config = results[name]["model"].config.__class__.from_dict(results[name]["model"].config.to_dict())
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = build_model(config, seed=1).eval()
    plain.load_state_dict(results[name]["model"].state_dict())
    with torch.no_grad():
        assert (plain(input_ids=ids, use_cache=False).logits - results[name]["logits"]).abs().max() > 1e-3


# qwen2-tied: AutoTokenizer would swap in Qwen2Tokenizer for the generic tokenizer we saved (ids [8, 8] here).
@pytest.mark.parametrize("name", ["qwen3", "mistral", "qwen2-tied"])
def test_load_model_and_tokenizer(exported, name):
    ids, results = exported
    model = load_model(results[name]["dir"])
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids, use_cache=False).logits, results[name]["logits"])
    tok = load_tokenizer(results[name]["dir"])
    assert tok("the cat sat").input_ids == make_tokenizer()("the cat sat").input_ids == [4, 5, 6]


def test_build_model_seeded_and_leaves_global_rng_alone():
    config = preset_config("tiny-llama", 64)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model(config, 5), build_model(config, 5), build_model(config, 6)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[w], sc[w])
    assert a.dtype == torch.float32 and a.config.use_cache is False


class _Wrapper(torch.nn.Module):
    """Stands in for DDP (`.module`) wrapping a torch.compile'd model (`._orig_mod`)."""

    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


def test_save_unwraps_casts_to_fp32_and_replaces_atomically(tmp_path):
    model = build_model(preset_config("tiny-llama", 64), seed=0)
    fp32_weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    wrapped = _Wrapper(_Wrapper(model, "_orig_mod"), "module")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    assert save_hf_checkpoint(wrapped, None, out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .tmp-/.old- leftovers
    assert not (out / "stale.txt").exists() and not (out / "midtrain.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert model.config.use_cache is False
    reloaded = load_model(out).state_dict()
    for k, v in fp32_weights.items():  # bf16 weights, exported as fp32 values of those bf16 numbers
        assert reloaded[k].dtype == torch.float32
        assert torch.equal(reloaded[k], v.to(torch.bfloat16).float())


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        load_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}.*has no config.json"):
        load_model(tmp_path / "empty")
    build_model(preset_config("tiny-llama", 64), 0).config.save_pretrained(tmp_path / "cfg-only")
    with pytest.raises(FileNotFoundError, match="cfg-only.*has no weights"):
        load_model(tmp_path / "cfg-only")
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="empty.*has none of"):
        load_tokenizer(tmp_path / "empty")
