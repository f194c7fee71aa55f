"""AdamW parameter groups: weight decay on matrices only, never on norms, biases or embeddings."""

from __future__ import annotations

from midtrain.config import OptimizerConfig
from midtrain.model import build_model, preset_config
from midtrain.train.optim import build_optimizer


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = build_model(preset_config("tiny-qwen2", vocab_size=300), seed=0)  # qwen2: q/k/v biases, tied embeddings
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names
    assert any(n.endswith("input_layernorm.weight") for n in no_decay_names)
    assert any(n.endswith("q_proj.bias") for n in no_decay_names)
    assert all(n.endswith("proj.weight") for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
