"""midtrain's RoPE remapping against transformers 5.x, bit for bit.

Every comparison is exact: `torch.equal` on the float32 inverse frequencies and `==` on the attention factor (no
tolerance anywhere; midtrain follows transformers' operation order, REFERENCE §4). The grid: head_dim (32, 64, 128)
x base (1e4, 5e5) x factor (2, 4, 8) x L0 (128, 2048) x partial_rotary_factor (1.0, 0.5) = 72 model shapes, times
each method's variants (yarn: truncate on/off x 4 attention settings x 2 beta settings; llama3: 2 band settings;
dynamic and longrope: sequence lengths below, at and above their reference length).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StableLmConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

from midtrain.context import RotarySpec, apply_rope, compute, to_rope_parameters
from midtrain.context.rope import dynamic, ntk_base, yarn_extrapolation

HEAD_DIMS = (32, 64, 128)
BASES = (1e4, 5e5)
FACTORS = (2, 4, 8)
ORIGINALS = (128, 2048)
PARTIAL = (1.0, 0.5)
GRID = list(itertools.product(HEAD_DIMS, BASES, FACTORS, ORIGINALS, PARTIAL))


def hf_config(head_dim: int, partial: float, rope_parameters: dict, max_pos: int):
    """A config built the way transformers builds one from config.json.

    partial_rotary_factor 1.0: LlamaConfig (head_dim given). 0.5: StableLmConfig, which has a top-level
    `partial_rotary_factor` (moved into rope_parameters by transformers) and no head_dim (hidden // heads).
    """
    if partial == 1.0:
        return LlamaConfig(
            hidden_size=2 * head_dim,
            num_attention_heads=2,
            head_dim=head_dim,
            num_hidden_layers=1,
            vocab_size=16,
            max_position_embeddings=max_pos,
            rope_parameters=dict(rope_parameters),
        )
    rp = {k: v for k, v in rope_parameters.items() if k != "partial_rotary_factor"}
    return StableLmConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=16,
        max_position_embeddings=max_pos,
        partial_rotary_factor=partial,
        rope_parameters=rp,
    )


def base_spec(head_dim: int, base: float, L0: int, partial: float) -> RotarySpec:
    """The spec of the pre-extension model, read from its HF config (also tests from_config)."""
    spec = RotarySpec.from_config(hf_config(head_dim, partial, {"rope_type": "default", "rope_theta": base}, L0))
    assert (spec.head_dim, spec.base, spec.partial_rotary_factor, spec.max_position_embeddings) == (
        head_dim,
        base,
        partial,
        L0,
    )
    assert spec.original_max_position_embeddings is None  # never guessed from max_position_embeddings
    return spec


def variants(method: str, s: int, L0: int, dim: int, seed: int) -> list[tuple[dict, list]]:
    """(midtrain params, seq_lens) per method; seq_len None = what the rotary module computes at init."""
    if method == "linear":
        return [({"factor": s}, [None])]
    if method == "dynamic":  # reference length L0: below, at, just above, far above
        return [
            ({"factor": s, "original_max_position_embeddings": L0}, [None, L0 // 2, L0, L0 + 1, 3 * L0]),
            ({"factor": float(s)}, [None, 5 * L0]),
        ]
    if method == "llama3":
        return [
            ({"factor": s, "original_max_position_embeddings": L0}, [None]),
            (
                {"factor": s, "original_max_position_embeddings": L0, "low_freq_factor": 2, "high_freq_factor": 8},
                [None],
            ),
        ]
    if method == "yarn":
        out = []
        attention = [
            {},
            {"mscale": 1, "mscale_all_dim": 1},
            {"mscale": 0.707, "mscale_all_dim": 1.0},
            {"attention_factor": 1.25},
        ]
        betas = [{}, {"beta_fast": 4, "beta_slow": 0.5}]
        for truncate, att, beta in itertools.product((True, False), attention, betas):
            out.append(
                ({"factor": s, "original_max_position_embeddings": L0, "truncate": truncate, **att, **beta}, [None])
            )
        return out
    if method == "longrope":
        g = torch.Generator().manual_seed(seed)
        short = (1 + 0.5 * torch.rand(dim // 2, generator=g)).tolist()
        long = (1 + (s - 1) * torch.rand(dim // 2, generator=g)).sort().values.tolist()
        common = {"short_factor": short, "long_factor": long, "original_max_position_embeddings": L0}
        return [
            ({**common, "factor": s}, [None, L0 // 2, L0, L0 + 1, 4 * L0]),
            ({**common, "max_position_embeddings": s * L0}, [None, L0 + 1]),  # factor from L / L0 (Phi-3 style)
            ({**common, "factor": s, "attention_factor": 1.1}, [L0 + 1]),
        ]
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3", "longrope"])
def test_scaled_methods_equal_transformers(method):
    compared, failures = 0, []
    for head_dim, base, s, L0, partial in GRID:
        spec = base_spec(head_dim, base, L0, partial)
        for params, seq_lens in variants(method, s, L0, spec.dim, seed=head_dim * s + L0):
            rope_parameters, max_pos = to_rope_parameters(method, params, spec)
            assert rope_parameters["rope_type"] == method
            config = hf_config(head_dim, partial, rope_parameters, max_pos)
            for seq_len in seq_lens:
                ours, our_attn = compute(method, spec, params, seq_len=seq_len)
                theirs, their_attn = ROPE_INIT_FUNCTIONS[method](config, None, seq_len=seq_len)
                compared += 1
                if not (
                    ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs) and our_attn == their_attn
                ):
                    failures.append((head_dim, base, s, L0, partial, params.keys(), seq_len))
    assert not failures, f"{len(failures)} of {compared} differ, e.g. {failures[:3]}"
    assert compared >= len(GRID) * sum(len(v[1]) for v in variants(method, 2, 128, 64, 0))


@pytest.mark.parametrize("method", ["default", "abf", "ntk"])
def test_theta_methods_equal_the_models_default_computation(method):
    """default / abf / ntk export as rope_type default with a new theta: each model's own default computation."""
    for head_dim, base, s, L0, partial in GRID:
        spec = base_spec(head_dim, base, L0, partial)
        params = {"default": {}, "abf": {"rope_theta": base * 50}, "ntk": {"factor": s}}[method]
        rope_parameters, max_pos = to_rope_parameters(method, params, spec)
        assert rope_parameters["rope_type"] == "default" and max_pos == L0  # max_pos not read: unchanged
        config = hf_config(head_dim, partial, rope_parameters, max_pos)
        rotary = LlamaRotaryEmbedding if partial == 1.0 else StableLmRotaryEmbedding  # Llama ignores partial
        theirs, their_attn = rotary.compute_default_rope_parameters(config)
        ours, our_attn = compute(method, spec, params)
        assert torch.equal(ours, theirs) and our_attn == their_attn == 1.0, (head_dim, base, s, L0, partial)
        assert torch.equal(rotary(config).inv_freq, ours)  # and the module built from the export


def test_ntk_theta_is_the_formula():
    for head_dim, base, s, _, partial in GRID:
        d = int(head_dim * partial)
        rope_parameters, _ = to_rope_parameters(
            "ntk", {"factor": s}, RotarySpec(head_dim=head_dim, base=base, partial_rotary_factor=partial)
        )
        assert rope_parameters["rope_theta"] == ntk_base(base, s, d)
        assert math.isclose(rope_parameters["rope_theta"], base * s ** (d / (d - 2)), rel_tol=1e-15)
        # the lowest frequency is interpolated by exactly s, the highest kept
        inv, _ = compute("ntk", RotarySpec(head_dim=head_dim, base=base, partial_rotary_factor=partial), {"factor": s})
        ref, _ = compute("default", RotarySpec(head_dim=head_dim, base=base, partial_rotary_factor=partial))
        assert inv[0] == ref[0] and math.isclose(float(ref[-1] / inv[-1]), s, rel_tol=1e-5)


def test_yarn_ramp_shape():
    spec = RotarySpec(head_dim=64, base=1e4, original_max_position_embeddings=256)
    e = yarn_extrapolation(spec)
    assert e[0] == 1 and e[-1] == 0 and torch.all(e[1:] <= e[:-1])  # kept fast dims, interpolated slow dims


def test_dynamic_tensor_seq_len_follows_the_rotary_module():
    """The module passes max(position_ids)+1 as a tensor: float32 base, not bit-equal to the python-int path."""
    model = one_layer_llama(max_position_embeddings=4096)
    apply_rope(model, {"method": "dynamic", "factor": 4, "original_max_position_embeddings": 128})
    rotary = model.model.rotary_emb
    spec = RotarySpec.from_config(model.config)
    assert spec.max_position_embeddings == 128  # dynamic exports max_pos = L0: it only rescales beyond it
    differ = 0
    for n in (100, 129, 137, 200, 513, 1000):
        position_ids = torch.arange(n)[None]
        rotary(torch.zeros(1, n, 128), position_ids)
        ours, _ = dynamic(spec, factor=4, seq_len=torch.max(position_ids) + 1)
        assert torch.equal(rotary.inv_freq, ours), n
        differ += not torch.equal(ours, dynamic(spec, factor=4, seq_len=n)[0])
    assert differ > 0  # documented in docs/ROPE.md: the int and tensor paths differ in the last bits


def one_layer_llama(max_position_embeddings: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, num_hidden_layers=1, vocab_size=16,
                         max_position_embeddings=max_position_embeddings)
    return LlamaForCausalLM(config)


def _cos_sin(inv_freq: torch.Tensor, attention_factor: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(n)[None, :, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


@pytest.mark.parametrize(
    "rope,lengths",
    [
        ({"method": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 4}, [50, 200]),
        ({"method": "yarn", "factor": 8, "original_max_position_embeddings": 64, "attention_factor": 1.5}, [300]),
        ({"method": "llama3", "factor": 4, "original_max_position_embeddings": 64}, [200]),
        (
            {
                "method": "longrope",
                "short_factor": [1.0] * 32,
                "long_factor": [1.0 + j / 8 for j in range(32)],
                "factor": 4,
                "original_max_position_embeddings": 64,
            },
            [50, 64, 65, 200],
        ),
    ],
)
def test_model_cos_sin_equal_ours(rope, lengths):
    model = one_layer_llama(max_position_embeddings=2048)
    spec = RotarySpec.from_config(model.config)
    apply_rope(model, rope)
    params = {k: v for k, v in rope.items() if k != "method"}
    for n in lengths:
        cos, sin = model.model.rotary_emb(torch.zeros(1, n, 128), torch.arange(n)[None])
        inv, attn = compute(rope["method"], spec, params, seq_len=n)
        want_cos, want_sin = _cos_sin(inv, attn, n)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), n
        assert model.model.rotary_emb.attention_scaling == attn
