"""Training faults: a NaN step or a loss spike skips the update, the batch counts as consumed, the run goes on."""

from __future__ import annotations

import math

import pytest
import torch

import midtrain.run.stage as run_module
from midtrain.config import load_recipe
from midtrain.run import RunOptions, run
from midtrain.train.trainer import skip_reason

from .tiny import train_rows, write_recipe


def test_skip_reason():
    assert skip_reason(2.0, 1.0, None, True, None) is None
    assert skip_reason(math.nan, 1.0, 2.0, True, None) == "nonfinite"
    assert skip_reason(2.0, math.inf, 2.0, True, None) == "nonfinite"
    assert skip_reason(math.nan, 1.0, 2.0, False, None) is None  # guard off: the caller asked for it
    assert skip_reason(7.0, 1.0, 2.0, True, 3.0) == "spike"
    assert skip_reason(5.9, 1.0, 2.0, True, 3.0) is None
    assert skip_reason(99.0, 1.0, None, True, 3.0) is None  # no reference yet on a stage's first step


@pytest.fixture()
def poisoned_forward(monkeypatch):
    """NaN logits on the 3rd training forward (eval forwards run in eval mode and are left alone)."""
    real = run_module.forward_packed
    calls = {"train": 0}

    def forward(model, batch, **kw):
        logits = real(model, batch, **kw)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 3:
                return logits * torch.nan
        return logits

    monkeypatch.setattr(run_module, "forward_packed", forward)


def test_nan_step_is_skipped_and_the_weights_stay_finite(tmp_path, poisoned_forward):
    recipe = load_recipe(write_recipe(tmp_path), [f"run_dir={tmp_path / 'run'}", "stages.warm.batch.micro=null"])
    run(recipe, RunOptions(progress=False))
    rows = train_rows(tmp_path / "run")
    bad = [r for r in rows if r.get("skipped")]
    assert [r["skipped"] for r in bad] == ["nonfinite"] and math.isnan(bad[0]["loss"])
    after = [r for r in rows if r["step"] > bad[0]["step"]]
    assert after and all(math.isfinite(r["loss"]) for r in after)  # the NaN never reached the weights
    assert rows[-1]["tokens"] == recipe.stages[0].tokens + recipe.stages[1].tokens  # the skipped batch counts
