"""Architecture conversion: GQA mean-pooling and MoE upcycling against exact oracles, exports, aux loss, optimizer.

Tolerance for "equal to the dense model": fp32 logits of order 1, `atol=1e-6, rtol=0` (top-2 routing sums two
normalised weights, so the output is the dense MLP's times (w1 + w2) = 1 up to one rounding: ~2e-7 measured).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from midtrain.config import ConvertConfig
from midtrain.model import build_model, forward_packed, preset_config, save_hf_checkpoint
from midtrain.model.convert import (
    convert_gqa,
    convert_model,
    gqa_problems,
    load_optimizer_except_changed,
    mean_pool_heads,
    moe_problems,
    recipe_conversion_problems,
    upcycle_moe,
    with_router_aux_loss,
)
from midtrain.train import checkpoint as ckpt
from tests.reload import reload_in_fresh_process

ATOL = 1e-6
VOCAB = 97


def _model(preset: str = "tiny-llama", seed: int = 1, **overrides):
    return build_model(preset_config(preset, vocab_size=VOCAB, **overrides), seed=seed).eval()


def _ids(rows: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, t), generator=torch.Generator().manual_seed(seed))


def _packed_batch(rows: int = 2, t: int = 24) -> dict[str, torch.Tensor]:
    """Two documents per row (positions restart at t // 3) and a padded tail in the last row."""
    ids = _ids(rows, t)
    pos = torch.arange(t).repeat(rows, 1)
    pos[:, t // 3 :] -= t // 3
    labels = ids.clone()
    labels[:, 0] = labels[:, t // 3] = -100
    source_ids = torch.zeros_like(ids)
    source_ids[-1, -5:] = -1  # padding: its own segment, no labels, no routing statistics
    labels[-1, -5:] = -100
    pos[-1, -5:] = torch.arange(5)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "source_ids": source_ids}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- GQA


def test_mean_pool_heads_matches_a_hand_computed_reference():
    # 4 heads of dim 2 over 3 inputs -> 2 groups: group g = mean of heads 2g and 2g+1, row by row.
    w = torch.arange(24, dtype=torch.float32).reshape(8, 3)
    expected = torch.tensor([
        [3.0, 4.0, 5.0],  # mean(row 0 [0,1,2], row 2 [6,7,8])    head 0/1, dim 0
        [6.0, 7.0, 8.0],  # mean(row 1 [3,4,5], row 3 [9,10,11])  head 0/1, dim 1
        [15.0, 16.0, 17.0],  # mean(row 4, row 6)                 head 2/3, dim 0
        [18.0, 19.0, 20.0],  # mean(row 5, row 7)                 head 2/3, dim 1
    ])
    assert torch.equal(mean_pool_heads(w, 4, 2, 2), expected)
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert torch.equal(mean_pool_heads(bias, 4, 2, 2), torch.tensor([2.0, 3.0, 6.0, 7.0]))
    assert torch.equal(mean_pool_heads(bias, 4, 1, 2), torch.tensor([4.0, 5.0]))
    assert torch.equal(mean_pool_heads(w, 4, 4, 2), w)


def test_gqa_with_as_many_groups_as_kv_heads_is_exactly_the_same_model():
    dense = _model("tiny-qwen2")  # 4 query heads, 2 kv heads, qkv biases
    new, report = convert_model(dense, ConvertConfig(kind="gqa", num_key_value_heads=2), probe={"input_ids": _ids()})
    assert report.changed == []
    assert report.drift["rel_logits_error"] == 0.0 and report.drift["loss_delta"] == 0.0
    assert torch.equal(_logits(new, _ids()), _logits(dense, _ids()))


def test_gqa_groups_consecutive_kv_heads_as_transformers_maps_query_heads():
    """kv heads made equal within each pair pool exactly: zero drift proves the grouping (a strided grouping
    would average different heads and move the logits)."""
    dense = _model(num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    with torch.no_grad():
        for layer in dense.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(4, 32, -1)
                w[1], w[3] = w[0], w[2]
    new, changed = convert_gqa(dense, 2)
    assert new.config.num_key_value_heads == 2 and new.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)
    assert len(changed) == 2 * 2  # k and v of 2 layers
    torch.testing.assert_close(_logits(new, _ids()), _logits(dense, _ids()), atol=ATOL, rtol=0)


def test_gqa_pooling_reports_its_drift():
    dense = _model(num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    probe = _packed_batch()
    drifts = []
    for groups in (4, 2, 1):
        new, report = convert_model(dense, ConvertConfig(kind="gqa", num_key_value_heads=groups), probe=probe)
        logits = forward_packed(new, probe).detach()
        reference = forward_packed(dense, probe).detach()
        expected = float((logits - reference).norm() / reference.norm())
        assert report.drift["rel_logits_error"] == pytest.approx(expected, rel=1e-5)
        assert report.drift["loss_delta"] == pytest.approx(report.drift["loss_after"] - report.drift["loss_before"])
        drifts.append(report.drift["rel_logits_error"])
    assert drifts[0] == 0.0 and 0.0 < drifts[1] and 0.0 < drifts[2]


def test_gqa_problems_name_the_constraint():
    cfg = preset_config("tiny-qwen2", vocab_size=VOCAB)  # 4 heads, 2 kv heads
    assert gqa_problems(cfg, 2) == [] and gqa_problems(cfg, 1) == []
    assert "exceeds the model's 2 kv heads" in gqa_problems(cfg, 4)[0]
    assert "must divide num_attention_heads (4), got 3" in gqa_problems(cfg, 3)[0]
    six = preset_config("tiny-llama", vocab_size=VOCAB, num_attention_heads=6, num_key_value_heads=6, head_dim=16,
                        hidden_size=96)
    assert "current num_key_value_heads (6)" in " ".join(gqa_problems(six, 4))
    gpt2 = SimpleNamespace(model_type="gpt2", num_attention_heads=4, num_key_value_heads=4)
    assert "GQA conversion supports" in gqa_problems(gpt2, 2)[0]


# --------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_upcycled_moe_with_identical_experts_equals_the_dense_model(top_k, router_init):
    dense = _model()
    moe, changed = upcycle_moe(dense, 4, top_k, router_init=router_init, seed=5)
    moe.eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    assert moe.config.rope_parameters == dense.config.rope_parameters
    assert len(changed) == 3 * dense.config.num_hidden_layers
    torch.testing.assert_close(_logits(moe, _ids()), _logits(dense, _ids()), atol=ATOL, rtol=0)
    batch = _packed_batch()  # the document-masked path the trainer uses
    with torch.no_grad():
        torch.testing.assert_close(forward_packed(moe, batch), forward_packed(dense, batch), atol=ATOL, rtol=0)


def test_upcycled_experts_are_copies_of_the_mlp_and_the_router_is_seeded():
    dense = _model()
    moe, _ = upcycle_moe(dense, 3, 2, seed=7)
    mlp, experts = dense.model.layers[1].mlp, moe.model.layers[1].mlp.experts
    for e in range(3):
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        assert torch.equal(gate, mlp.gate_proj.weight) and torch.equal(up, mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)
    assert torch.equal(moe.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(moe.lm_head.weight, dense.lm_head.weight)
    router = moe.model.layers[0].mlp.gate.weight
    assert torch.equal(router, upcycle_moe(dense, 3, 2, seed=7)[0].model.layers[0].mlp.gate.weight)
    assert not torch.equal(router, upcycle_moe(dense, 3, 2, seed=8)[0].model.layers[0].mlp.gate.weight)
    assert 0.01 < float(router.detach().std()) < 0.03  # N(0, initializer_range=0.02)
    assert not upcycle_moe(dense, 3, 2, router_init="zeros")[0].model.layers[0].mlp.gate.weight.any()


def test_moe_problems_refuse_what_mixtral_cannot_hold():
    assert moe_problems(preset_config("tiny-llama", vocab_size=VOCAB), 4, 2) == []
    assert "turns ['llama', 'mistral'] models into Mixtral (got 'qwen2')" in moe_problems(
        preset_config("tiny-qwen2", vocab_size=VOCAB), 4, 2)[0]
    biased = preset_config("tiny-llama", vocab_size=VOCAB, attention_bias=True)
    assert "attention_bias=true" in moe_problems(biased, 4, 2)[0]
    assert "top_k must lie in [1, num_experts=2], got 3" in moe_problems(preset_config("tiny-llama", vocab_size=97), 2, 3)


def test_recipe_problems_follow_the_chain_of_conversions():
    stages = [SimpleNamespace(name="a", convert=ConvertConfig(kind="gqa", num_key_value_heads=1)),
              SimpleNamespace(name="b", convert=ConvertConfig(kind="gqa", num_key_value_heads=2)),
              SimpleNamespace(name="c", convert=ConvertConfig(kind="moe", num_experts=2, top_k=1))]
    recipe = SimpleNamespace(stages=stages, stage_init=lambda i: "weights")
    problems = recipe_conversion_problems(recipe, preset_config("tiny-qwen2", vocab_size=VOCAB))
    assert problems == [
        "stages.b.convert: num_key_value_heads 2 exceeds the model's 1 kv heads (pooling only removes heads)",
        "stages.c.convert: MoE upcycling turns ['llama', 'mistral'] models into Mixtral (got 'qwen2')",
    ]


# --------------------------------------------------------------------------- exports


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10-20 s on a shared machine
def test_converted_exports_reload_in_plain_transformers_with_identical_logits(tmp_path):
    dense = _model(num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    gqa, _ = convert_gqa(dense, 2)
    moe, _ = upcycle_moe(dense, 4, 2, seed=3)
    dirs = {"gqa": save_hf_checkpoint(gqa, None, tmp_path / "gqa"), "moe": save_hf_checkpoint(moe, None, tmp_path / "moe")}
    ids = _ids()
    reloaded = reload_in_fresh_process(dirs, ids, tmp_path)
    for name, model in (("gqa", gqa), ("moe", moe)):
        torch.testing.assert_close(reloaded[name]["logits"], _logits(model.eval(), ids), atol=ATOL, rtol=0)
        assert reloaded[name]["rope_parameters"] == dense.config.rope_parameters


# --------------------------------------------------------------------------- training: aux loss, optimizer


def _switch_loss(router_logits: list[torch.Tensor], mask: torch.Tensor, n_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer load balancing, written out: E * sum_e f_e * P_e, where f_e (share of top-k slots) and
    P_e (mean router probability) are averaged over all layers' real tokens."""
    keep = mask.reshape(-1)
    slots, probs = torch.zeros(n_experts), torch.zeros(n_experts)
    for logits in router_logits:
        p = logits.float().softmax(-1)[keep]
        chosen = p.topk(top_k, dim=-1).indices
        slots += F.one_hot(chosen, n_experts).sum(dim=(0, 1)).float()
        probs += p.sum(0)
    rows = keep.sum() * len(router_logits)
    return n_experts * ((slots / rows) * (probs / rows)).sum()


def test_moe_forward_returns_the_router_load_balancing_loss():
    moe, _ = upcycle_moe(_model(), 4, 2, router_aux_loss_coef=0.5, router_init_std=1.0, seed=2)
    batch = _packed_batch()
    captured = []
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: captured.append(out[0]))
               for layer in moe.model.layers]
    logits, aux = with_router_aux_loss(moe, forward_packed)(moe, batch)
    for h in handles:
        h.remove()
    expected = 0.5 * _switch_loss(captured, batch["source_ids"] >= 0, 4, 2)
    torch.testing.assert_close(aux, expected, atol=1e-6, rtol=1e-6)
    assert aux.requires_grad and logits.shape == (2, 24, VOCAB)


def test_dense_forward_is_untouched():
    dense = _model()
    assert with_router_aux_loss(dense, forward_packed) is forward_packed


def _one_trainer_step(model, forward, batch, tmp_path):
    """One step of the real Trainer with plain SGD(lr=1): the weight change is minus the gradient it applied."""
    from midtrain.config import load_recipe
    from midtrain.plan import build_plan
    from midtrain.train.distributed import DistInfo
    from midtrain.train.trainer import Trainer
    from tests.train.tiny import write_recipe

    stage = build_plan(load_recipe(write_recipe(tmp_path), ["stages.warm.schedule.peak_lr=1.0",
                                                             "stages.warm.schedule.warmup_tokens=0"])).stages[0]
    loader = SimpleNamespace(next_step=lambda: [dict(batch)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model=model, optimizer=optimizer, loader=loader, stage=stage, forward=forward,
                      dist=DistInfo(), domains=["general"], precision="fp32", grad_clip=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    row = trainer.train_step()
    return row, {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_trainer_adds_the_aux_loss_to_the_objective(tmp_path):
    moe, _ = upcycle_moe(_model(), 4, 2, router_aux_loss_coef=0.5, router_init_std=1.0, seed=2)
    moe.train()
    batch = _packed_batch()
    reference = upcycle_moe(_model(), 4, 2, router_aux_loss_coef=0.5, router_init_std=1.0, seed=2)[0].train()
    logits, aux = with_router_aux_loss(reference, forward_packed)(reference, batch)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    lm = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    (lm + aux).backward()

    row, step = _one_trainer_step(moe, with_router_aux_loss(moe, forward_packed), batch, tmp_path)
    assert row["loss"] == pytest.approx(float(lm.detach()), rel=1e-6)
    assert row["aux_loss"] == pytest.approx(float(aux.detach()), rel=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(step[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    router = "model.layers.0.mlp.gate.weight"  # the aux term's share of the router's gradient is not negligible
    assert float(step[router].norm()) > 0 and not torch.allclose(step[router], _lm_only_grad(batch)[router], atol=1e-4)


def _lm_only_grad(batch):
    model = upcycle_moe(_model(), 4, 2, router_aux_loss_coef=0.5, router_init_std=1.0, seed=2)[0].train()
    logits = forward_packed(model, batch)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_trainer_row_of_a_dense_model_has_no_aux_loss(tmp_path):
    dense = _model().train()
    row, _ = _one_trainer_step(dense, with_router_aux_loss(dense, forward_packed), _packed_batch(), tmp_path)
    assert "aux_loss" not in row


@pytest.mark.parametrize("spec", [ConvertConfig(kind="gqa", num_key_value_heads=1),
                                  ConvertConfig(kind="moe", num_experts=2, top_k=1)])
def test_optimizer_state_restarts_exactly_for_the_converted_parameters(tmp_path, spec):
    dense = _model().train()
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    for _ in range(2):
        forward_packed(dense, _packed_batch()).float().pow(2).mean().backward()
        optimizer.step()
    torch.save(ckpt.optimizer_state(dense, optimizer), tmp_path / "optimizer.pt")
    new, report = convert_model(dense, spec, seed=0)
    new_optimizer = torch.optim.AdamW(new.parameters(), lr=1e-3)
    fresh = load_optimizer_except_changed(tmp_path / "optimizer.pt", new, new_optimizer)
    assert fresh == sorted(report.changed)
    old_state = {n: optimizer.state[p] for n, p in dense.named_parameters()}
    for name, p in new.named_parameters():
        if name in fresh:
            assert p not in new_optimizer.state  # a new AdamW's state: created on the first step
        else:
            assert torch.equal(new_optimizer.state[p]["exp_avg"], old_state[name]["exp_avg"])
            assert float(new_optimizer.state[p]["step"]) == 2


def test_contracts_table_lists_exactly_the_convert_keys():
    from tests.test_contracts import _table_keys

    assert _table_keys("### 1.2 Conversion") == set(ConvertConfig.model_fields)
