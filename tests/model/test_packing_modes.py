"""How a family's packed rows are run (`midtrain.model.families`), and what rides on it: the attention a family is
loaded with, the per-document forward's gradients and its MoE load-balancing loss. The packed-vs-alone oracle over
every family is tests/model/test_families.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from midtrain.model import build_model, forward_packed
from midtrain.model.convert import with_router_aux_loss
from midtrain.model.families import (
    choose_attention,
    describe_packing,
    layer_types,
    packing_mode,
    unknown_layer_types,
)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128)


def config(model_type: str, **kwargs):
    return AutoConfig.for_model(model_type, **{**TINY, **kwargs})


def qwen3_next(**kwargs):
    return config("qwen3_next", layer_types=["linear_attention", "full_attention"], num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                  linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                  router_aux_loss_coef=0.1, **kwargs)


def test_packing_mode_follows_the_layers_not_the_family_name():
    assert packing_mode(config("llama"), 64) == "document_mask"
    assert packing_mode(config("mistral", sliding_window=16), 64) == "layer_masks"
    assert packing_mode(config("mistral", sliding_window=64), 64) == "document_mask"  # the window covers a row
    assert packing_mode(config("mistral", sliding_window=16, use_sliding_window=False), 64) == "document_mask"
    gemma3 = config("gemma3_text", sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert packing_mode(gemma3, 64) == "layer_masks"
    llama4 = config("llama4_text", attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"])
    assert packing_mode(llama4, 64) == "layer_masks"
    assert packing_mode(qwen3_next(), 64) == "per_document"
    assert packing_mode(config("lfm2", layer_types=["conv", "full_attention"]), 64) == "per_document"
    assert layer_types(config("mistral", sliding_window=16)) == ["sliding_attention"] * 2
    exotic = SimpleNamespace(num_hidden_layers=2, layer_types=["full_attention", "indexed_attention"])
    assert unknown_layer_types(exotic) == ["indexed_attention"]
    assert packing_mode(exotic, 64) == "per_document"  # a document alone is right whatever the layer computes
    assert "unknown to midtrain" in describe_packing(exotic, 64)


def test_the_packing_line_says_why():
    assert "sliding window 8 < seq_len 64" in describe_packing(config("mistral", sliding_window=8), 64)
    line = describe_packing(qwen3_next(), 64)
    assert "every document runs alone" in line and "linear_attention" in line


def test_auto_attention_is_sdpa_where_offered_else_eager_and_explicit_choices_are_checked():
    assert choose_attention(config("llama")).implementation == "sdpa"
    gemma2 = config("gemma2", sliding_window=8)
    assert choose_attention(gemma2).implementation == "eager"  # soft-capped logits: transformers offers no sdpa
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not offer attention 'sdpa'"):
        choose_attention(gemma2, "sdpa")
    assert choose_attention(config("llama"), "eager").implementation == "eager"
    # build_model picks it too: a family without sdpa builds instead of being refused
    assert build_model(gemma2, seed=0).config._attn_implementation == "eager"


def _packed_batch(lengths: list[list[int]], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths[0])
    ids = torch.randint(1, vocab, (len(lengths), t), generator=gen)
    pos = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    return {"input_ids": ids, "position_ids": pos}


def test_per_document_forward_gradients_equal_each_document_alone():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("lfm2", layer_types=["conv", "full_attention"])).eval()
    lengths = [[10, 3, 19], [32]]
    batch = _packed_batch(lengths, 64)
    target = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))
    (forward_packed(model, batch) * target).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            logits = model(input_ids=batch["input_ids"][r : r + 1, start : start + n], use_cache=False).logits
            (logits[0] * target[r, start : start + n]).sum().backward()
            start += n
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_router_loss_of_a_per_document_forward_counts_each_real_token_once():
    """Qwen3-Next (linear attention + MoE) runs documents alone; its load-balancing loss must be the one over the
    packed tokens: each real token's router logits once, padding segments (source -1) left out."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_next()).eval()
    lengths = [[5, 20, 7], [12, 12, 8]]
    batch = _packed_batch(lengths, 64)
    batch["source_ids"] = torch.zeros(2, 32, dtype=torch.long)
    batch["source_ids"][1, 24:] = -1  # a padding segment: no loss, not counted by the router loss either
    _, aux = with_router_aux_loss(model, forward_packed)(model, batch)

    per_layer: list[list[torch.Tensor]] = [[], []]
    masks = []
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            out = model(input_ids=batch["input_ids"][r : r + 1, start : start + n], use_cache=False,
                        output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                per_layer[layer].append(logits.reshape(n, -1))
            masks.append(batch["source_ids"][r, start : start + n] >= 0)
            start += n
    gates = tuple(torch.cat(chunks) for chunks in per_layer)
    expected = load_balancing_loss_func(gates, 4, 2, torch.cat(masks)[None])
    torch.testing.assert_close(aux, 0.1 * expected, atol=1e-6, rtol=1e-5)
