"""Recipe -> plan: steps, global offsets, LR hand-over between stages, fingerprints."""

from __future__ import annotations

import pytest

from midtrain.config import Recipe
from midtrain.plan import build_plan


def _recipe(**stage2) -> Recipe:
    stage1 = dict(name="a", tokens=10_000, seq_len=100, batch={"tokens": 1000},
                  schedule={"kind": "cosine", "peak_lr": 1e-3, "min_lr": 1e-4, "warmup_tokens": 2000},
                  data={"mixture": {"web": 3, "math": 1}})
    two = dict(name="b", tokens=5_500, seq_len=100, batch={"tokens": 1000}, init="weights+optimizer",
               start_lr="from_previous", schedule={"kind": "wsd", "decay_fraction": 0.5},
               data={"mixture": {"math": 1}})
    two.update(stage2)
    return Recipe.model_validate({"base": "preset:tiny-llama", "tokenizer": "bytes",
                                  "sources": [{"name": "web", "path": "w"}, {"name": "math", "path": "m"}],
                                  "stages": [stage1, two]})


def test_steps_offsets_and_mixture():
    plan = build_plan(_recipe())
    a, b = plan.stages
    assert (a.steps, a.tokens, a.first_step, a.first_tokens) == (10, 10_000, 0, 0)
    assert (b.steps, b.tokens, b.first_step, b.first_tokens) == (6, 6_000, 10, 10_000)  # ceil(5500/1000)
    assert a.mixture == {"web": 0.75, "math": 0.25}
    assert plan.total_steps == 16


def test_from_previous_is_the_previous_stages_last_step_lr():
    a, b = build_plan(_recipe()).stages
    # a: cosine from 1e-3 (after 2000 warm-up tokens) to 1e-4 at T = 9000; its last step runs at t = 9000.
    assert a.last_lr == pytest.approx(1e-4)
    assert a.lr_at_step(5) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + __import__("math").cos(3 / 7 * 3.141592653589793)))
    assert b.lr_at_step(0) == a.last_lr  # exactly, not approximately
    assert b.schedule.peak_lr == a.last_lr and b.last_lr == 0.0


def test_rewarm_from_previous():
    b = build_plan(_recipe(schedule={"kind": "wsd", "peak_lr": 5e-4, "warmup_tokens": 2000})).stages[1]
    assert b.lr_at_step(0) == pytest.approx(1e-4)  # starts where a ended ...
    assert b.lr_at_step(2) == pytest.approx(5e-4)  # ... and re-warms to the new peak


def test_fingerprints_chain():
    base = build_plan(_recipe())
    changed_b = build_plan(_recipe(tokens=7_000))
    assert base.stages[0].fingerprint == changed_b.stages[0].fingerprint
    assert base.stages[1].fingerprint != changed_b.stages[1].fingerprint
    # eval settings do not change what a stage computes
    assert build_plan(_recipe(eval={"every_tokens": 1000})).stages[1].fingerprint == base.stages[1].fingerprint


def test_zero_inherited_lr_warns():
    recipe = _recipe()
    stages = [s.model_dump() for s in recipe.stages]
    stages[0]["schedule"].update(kind="wsd", min_lr=0.0)
    plan = build_plan(Recipe.model_validate({**recipe.model_dump(), "stages": stages}))
    assert any("from_previous is 0" in w for w in plan.warnings)
