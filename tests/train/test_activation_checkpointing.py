"""`activation_checkpointing: true` recomputes each decoder layer in backward: same loss, same gradients, and a
recipe run gives the same per-step losses (CPU recomputation is deterministic, so equality is exact)."""

from __future__ import annotations

import pytest
import torch

from midtrain.config import load_recipe
from midtrain.model import build_model, forward_packed, preset_config
from midtrain.model.loss import token_loss_sums
from midtrain.run import RunOptions, run

from .tiny import train_rows, write_recipe


def _loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny-llama", vocab_size=300), seed=0)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 96), generator=g)
    position_ids = torch.cat([torch.arange(40), torch.arange(56)]).repeat(2, 1)  # two packed documents per row
    labels = torch.where(position_ids == 0, -100, ids)
    batch = {"input_ids": ids, "position_ids": position_ids}
    loss, _, _ = token_loss_sums(forward_packed(model, batch), labels, torch.zeros_like(ids), 1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointing_gives_identical_loss_and_gradients():
    loss_a, grads_a = _loss_and_grads(False)
    loss_b, grads_b = _loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.slow
def test_recipe_option_keeps_per_step_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe_path = write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=1024, every=4096)
    losses = []
    for flag in (False, True):
        recipe = load_recipe(recipe_path, [f"run_dir={tmp_path / str(flag)}", f"activation_checkpointing={flag}"])
        run(recipe, RunOptions(progress=False))
        losses.append([r["loss"] for r in train_rows(tmp_path / str(flag))])
    assert len(losses[0]) == 6
    assert losses[0] == losses[1]
