"""EMA / tail weight averaging: oracles over recorded per-step weights, the start rule, exact resume, recipe checks."""

from __future__ import annotations

import pytest
import torch

from midtrain.config.recipe import AverageConfig, Recipe
from midtrain.schedule import LRSchedule, horizon_tokens_for
from midtrain.train.averaging import WeightAverager, start_tokens

from .test_gns import _problems, _recipe
from .toy_trainer import Bigram, Record, make_trainer, plan

B = 4 * 2 * 16  # tokens per step of the toy trainer


def _run(config: AverageConfig, steps: int = 12, schedule: LRSchedule | None = None):
    record = Record()
    trainer = make_trainer(steps, 0.05, [], schedule=schedule, optimizer="adamw")
    averager = WeightAverager(config, trainer.stage)
    trainer.callbacks = [averager, record]
    trainer.fit()
    return averager, record


def test_tail_average_over_constant_lr_steps_is_the_mean_of_the_per_step_weights():
    averager, record = _run(AverageConfig(kind="tail", start=4 * B))  # steps 5..12 (the 5th saw 4B tokens)
    oracle = torch.stack(record.weights[4:]).mean(0)
    assert averager.count == 8
    assert torch.allclose(averager.shadow["w"].double(), oracle, atol=1e-6, rtol=0)
    assert not torch.allclose(averager.shadow["w"].double(), record.weights[-1], atol=1e-3)  # it is not the last


def test_ema_follows_its_recursion_from_the_first_averaged_step():
    averager, record = _run(AverageConfig(kind="ema", decay=0.8, start=0))
    oracle = record.weights[0]
    for w in record.weights[1:]:
        oracle = 0.8 * oracle + 0.2 * w
    assert averager.count == 12
    assert torch.allclose(averager.shadow["w"].double(), oracle, atol=1e-6, rtol=0)


def test_start_decay_averages_exactly_the_steps_of_the_wsd_decay():
    steps = 10
    schedule = LRSchedule(kind="wsd", peak_lr=0.05, horizon_tokens=horizon_tokens_for(steps, B), decay_fraction=0.3)
    config = AverageConfig(kind="tail")
    averager, record = _run(config, steps, schedule)
    decaying = [i for i in range(steps) if schedule.lr(i * B) < 0.05 or i * B >= schedule.decay_start_tokens]
    assert start_tokens(config, plan(steps, B, schedule)) == schedule.decay_start_tokens
    assert averager.count == len(decaying) and decaying[-1] == steps - 1
    oracle = torch.stack([record.weights[i] for i in decaying]).mean(0)
    assert torch.allclose(averager.shadow["w"].double(), oracle, atol=1e-6, rtol=0)


def test_resume_mid_average_is_exact(tmp_path):
    """6 steps, save (weights, optimizer, loader RNG, shadow), 6 more in a fresh trainer == 12 straight."""
    config = AverageConfig(kind="ema", decay=0.7, start=2 * B)
    straight = make_trainer(12, 0.05, [], optimizer="adamw")
    full = WeightAverager(config, straight.stage)
    straight.callbacks = [full]
    straight.fit()

    first = make_trainer(12, 0.05, [], optimizer="adamw")
    part = WeightAverager(config, first.stage)
    first.callbacks = [part]
    first.stage = plan(6, B, first.stage.schedule)  # stop after 6 of the 12 steps
    first.fit()
    from safetensors.torch import save_file

    save_file(part.tensors(), str(tmp_path / "average.safetensors"))
    state = part.checkpoint_state()

    model = Bigram()
    model.load_state_dict(first.model.state_dict())
    second = make_trainer(12, 0.05, [], optimizer="adamw", model=model)
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.loader.g.set_state(first.loader.g.get_state())
    second.state = first.state
    resumed = WeightAverager(config, second.stage)
    resumed.restore(tmp_path, second.model, state)
    second.callbacks = [resumed]
    second.fit()
    assert resumed.count == full.count == 10
    assert torch.equal(resumed.shadow["w"], full.shadow["w"])
    assert torch.equal(second.model.w, straight.model.w)


def test_copy_to_puts_the_average_into_the_model_and_nothing_before_start():
    averager, record = _run(AverageConfig(kind="tail", start=0), steps=3)
    model = Bigram(seed=5)
    averager.copy_to(model)
    assert torch.allclose(model.w.double(), torch.stack(record.weights).mean(0), atol=1e-6)
    never = WeightAverager(AverageConfig(kind="tail", start=10**9), plan(3, B, LRSchedule(
        kind="constant", peak_lr=0.1, horizon_tokens=2 * B)))
    assert never.tensors() == {} and never.count == 0


def test_recipe_checks_for_average():
    wsd = {"kind": "wsd", "peak_lr": 1e-3, "decay_fraction": 0.2}
    assert _problems(_recipe(average={"kind": "ema", "decay": 0.99}, schedule=wsd)) == []
    assert _problems(_recipe(average={"kind": "tail", "start": "2k"})) == []
    assert any("average.start: 'decay' needs a decaying schedule" in p
               for p in _problems(_recipe(average={"kind": "tail"})))
    assert any("average.decay: applies to kind ema only" in p
               for p in _problems(_recipe(average={"kind": "tail", "decay": 0.9}, schedule=wsd)))
    assert any("average.start: must be below the stage's tokens (4096)" in p
               for p in _problems(_recipe(average={"kind": "tail", "start": 4096})))
    with pytest.raises(ValueError, match="expected 'decay' or a token count"):
        Recipe.model_validate(_recipe(average={"kind": "ema", "start": "decy"}))
    with pytest.raises(ValueError, match="kind"):
        Recipe.model_validate(_recipe(average={"kind": "swa"}))


def test_on_restore_rewinds_the_average_to_a_checkpoint(tmp_path):
    """What a step-guard roll-back calls: the shadow and count return to the checkpoint's."""
    from safetensors.torch import save_file

    averager, record = _run(AverageConfig(kind="tail", start=0), steps=4)
    save_file(averager.tensors(), str(tmp_path / "average.safetensors"))
    saved = {"average": averager.checkpoint_state()}
    at_save = averager.shadow["w"].clone()
    trainer = make_trainer(8, 0.05, [averager], optimizer="adamw")
    trainer.fit()
    assert averager.count == 12 and not torch.equal(averager.shadow["w"], at_save)
    averager.restore(tmp_path, trainer.model, saved["average"])
    assert averager.count == 4 and torch.equal(averager.shadow["w"], at_save)
