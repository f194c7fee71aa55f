"""A recipe stage with per-source length buckets trains end to end and keeps the bucket sampler in its state."""

from __future__ import annotations

import json

import pytest

from midtrain.config import load_recipe
from midtrain.run import RunOptions, run
from tests.train.tiny import write_recipe

pytestmark = pytest.mark.slow


def test_stage_with_length_buckets_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=4096, every=10**9),
                         [f"run_dir={run_dir}", "stages.anneal.data.source_length_buckets="
                          "{prose: [{max: 150, share: 0.3}, {min: 150, share: 0.7}]}"])
    run(recipe, RunOptions(progress=False))
    state = next((run_dir / "checkpoints" / "anneal").glob("step-*/trainer.json"), None)
    assert state is not None
    loader = json.loads(state.read_text())["loader"]
    tokens = loader["buckets"]["prose"]["tokens"]
    assert tokens[1] / sum(tokens) == pytest.approx(0.7, abs=0.05)  # a short stage: about one document of slack
    assert "segments" in loader["sources"]["prose"] and "buckets" not in loader["sources"]["math"]
