"""Preflight: `recipe check` and `run` make the same checks against the base, tokenizer and environment before any
training, and report every problem at once with its field."""

from __future__ import annotations

import pytest

from midtrain.config import load_recipe
from midtrain.plan import build_plan
from midtrain.run import RunError, RunOptions, preflight, run

from ..train.tiny import midtrain, write_recipe

# longrope needs one factor per rotated dimension pair: tiny-llama's head_dim gives more than 3 (a base-dependent
# error only a check against the base's config can find).
BAD_LONGROPE = ("stages.anneal.rope={method: longrope, factor: 2, original_max_position_embeddings: 32, "
                "long_factor: [1.0, 1.0, 1.0], short_factor: [1.0, 1.0, 1.0]}")


def _recipe(tmp_path, *overrides):
    return load_recipe(write_recipe(tmp_path), [f"run_dir={tmp_path / 'run'}", *overrides])


def test_a_preset_base_without_tokenizer_is_one_problem_naming_the_field(tmp_path):
    recipe = _recipe(tmp_path, "tokenizer=null")
    checks = preflight(recipe, build_plan(recipe))
    assert [p.field for p in checks.problems] == ["tokenizer"]
    assert "a preset base has no tokenizer" in checks.problems[0].message
    with pytest.raises(RunError, match="tokenizer: a preset base has no tokenizer"):
        run(recipe, RunOptions(progress=False))
    assert not (tmp_path / "run").exists()  # refused before the run dir, the lock or tokenizing


def test_every_problem_comes_back_at_once(tmp_path):
    recipe = _recipe(tmp_path, BAD_LONGROPE)
    checks = preflight(recipe, build_plan(recipe), options=RunOptions(override_gates=("nope",)))
    fields = [p.field for p in checks.problems]
    assert "--override-gate" in fields
    assert any(f.startswith("stages.anneal.rope.") for f in fields), fields
    with pytest.raises(RunError) as refused:
        run(recipe, RunOptions(progress=False, override_gates=("nope",)))
    assert f"{len(fields)} problems before training" in str(refused.value)
    assert all(str(p) in str(refused.value) for p in checks.problems)


def test_recipe_check_refuses_what_run_refuses(tmp_path):
    path = write_recipe(tmp_path)
    args = ("--set", f"run_dir={tmp_path / 'run'}", "--set", BAD_LONGROPE)
    check = midtrain("recipe", "check", str(path), *args, cache=tmp_path / "cache", check=False)
    assert check.returncode == 2, check.stderr
    assert "stages.anneal.rope." in check.stderr and "Traceback" not in check.stderr
    ran = midtrain("run", str(path), *args, cache=tmp_path / "cache", check=False)
    assert ran.returncode == 1 and "stages.anneal.rope." in ran.stderr and "Traceback" not in ran.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_check_prints_the_warnings_run_prints(tmp_path):
    """YaRN with stock beta_fast at a short L0 interpolates every dimension: both commands say so."""
    path = write_recipe(tmp_path)
    yarn = "stages.anneal.rope={method: yarn, factor: 2, original_max_position_embeddings: 32}"
    check = midtrain("recipe", "check", str(path), "--set", f"run_dir={tmp_path / 'run'}", "--set", yarn,
                     cache=tmp_path / "cache")
    assert "beta_fast" in check.stdout
