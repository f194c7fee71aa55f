"""Hostile recipes (property-based): whatever the YAML says, loading it returns a Recipe or raises RecipeError.

Never another exception type (a traceback from deep inside pydantic, yaml or the plan), never a hang: random YAML
structures, a valid recipe with one field replaced by a wrong type / unicode / huge number, raw text, `--set` noise.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midtrain.config import Recipe, RecipeError, load_recipe
from midtrain.plan import build_plan

VALID = {
    "base": "preset:tiny-llama",
    "tokenizer": "bytes",
    "seed": 1,
    "sources": [{"name": "prose", "path": "prose.jsonl", "holdout_docs": 2}],
    "checkpoint": {"every_tokens": 1024, "keep_last": 2},
    "step_guard": {"on_fault": "rollback", "spike_factor": 3.0},
    "stages": [
        {"name": "warm", "tokens": "4k", "seq_len": 64, "batch": {"tokens": 512, "micro": 4},
         "schedule": {"kind": "wsd", "peak_lr": 1e-3, "warmup_tokens": 512}, "data": {"mixture": {"prose": 1}},
         "eval": {"every_tokens": 1024, "max_docs": 2}},
        {"name": "long", "tokens": 2048, "seq_len": 128, "batch": {"tokens": 512},
         "schedule": {"kind": "cosine", "peak_lr": 1e-3}, "data": {"mixture": {"prose": 1}},
         "rope": {"method": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}},
    ],
}
SETTINGS = settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow], derandomize=True)

HUGE = st.sampled_from([10**30, -(10**30), 2**63, 1e308, -1e308, math.inf, -math.inf, math.nan, 1e-320])
SCALARS = (st.none() | st.booleans() | st.integers(-(10**6), 10**6) | HUGE
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "../../x", "/etc/passwd", "1e400", "2M", "-5", "ö✓𝔘\u202e", "preset:tiny-llama",
                              "hub:org/model", "null", "scratch", "fp16", "\x00", "~", "*", "&a"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), inner, max_size=4), max_leaves=12)


def _check(tmp_path: Path, text: str, overrides: list[str] | None = None) -> None:
    (tmp_path / "prose.jsonl").write_text('{"text": "a b c"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path, overrides or [])
    except RecipeError as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)
        return
    assert isinstance(recipe, Recipe)
    build_plan(recipe)  # a recipe that loads must also plan (what `recipe check` and `run` do next)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(VALID) if p]
FREE_KEYS = ("mixture", "gate", "rope")  # mappings whose keys are names, not schema fields
MODEL_PATHS = [p for p in [(), *ALL_PATHS] if not (p and p[-1] in FREE_KEYS)]


def test_the_valid_recipe_loads(tmp_path):
    recipe = load_recipe(_write(tmp_path, VALID))
    assert recipe.step_guard.on_fault == "rollback" and [s.name for s in recipe.stages] == ["warm", "long"]


def _write(tmp_path: Path, data) -> Path:
    (tmp_path / "prose.jsonl").write_text('{"text": "a b c"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@SETTINGS
@given(data=VALUES)
def test_random_yaml_structures(tmp_path, data):
    _check(tmp_path, yaml.safe_dump(data, allow_unicode=True))


@SETTINGS
@given(path=st.sampled_from(ALL_PATHS), value=VALUES)
def test_one_field_replaced_by_anything(tmp_path, path, value):
    data = copy.deepcopy(VALID)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    _check(tmp_path, yaml.safe_dump(data, allow_unicode=True))


@SETTINGS
@given(path=st.sampled_from(MODEL_PATHS), key=st.text(min_size=1, max_size=10))
def test_unknown_keys_anywhere(tmp_path, path, key):
    data = copy.deepcopy(VALID)
    node = data
    for part in path:
        node = node[part]
    if isinstance(node, dict) and key not in node:
        node[key] = 1
        try:
            load_recipe(_write(tmp_path, data))
        except RecipeError as exc:
            assert "unknown key" in str(exc)
        else:
            raise AssertionError(f"unknown key {key!r} at {path} was accepted")


@SETTINGS
@given(text=st.text(max_size=200) | st.sampled_from([
    "a: &a [1, 2]\nb: *a\n", "? [a, b]\n: c\n", "stages: !!python/object:os.system {}\n", "{", "- 1\n- 2\n",
    "base: preset:tiny-llama\nstages: [{name: s, tokens: 1e400, seq_len: 64, batch: {tokens: 64}}]\n",
    "\ufeffbase: x\n", "base: preset:tiny-llama\n" + "x: " + "[" * 500 + "]" * 500 + "\n",
    "x: " + "[" * 5000 + "]" * 5000 + "\n", "a: &a [*a]\nbase: x\n", "stages: &s [{name: s, x: *s}]\n",
]))
def test_raw_text(tmp_path, text):
    _check(tmp_path, text)


@SETTINGS
@given(overrides=st.lists(st.text(max_size=30) | st.sampled_from([
    "stages.warm.tokens=1e400", "stages.nope.tokens=1", "stages.0.0=1", "sources=5", "stages.warm.name=../../x",
    "seed=99999999999999999999999999", "stages.-9.tokens=1", "base.x=1", "=", "a..b=1"]), max_size=3))
def test_set_overrides(tmp_path, overrides):
    _check(tmp_path, yaml.safe_dump(VALID), overrides)


def test_alias_bomb_is_refused_at_once(tmp_path):
    """'Billion laughs': 9 anchors of 9 aliases each expand to ~10^9 nodes; refused before anything walks them."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "x:\n" + "\n".join("  " + line for line in lines) + "\nbase: preset:tiny-llama\nseed: *l8\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as exc:
        sizes = [10]  # a list node and its 9 scalars; each level: a list of 9 copies of the previous
        for _ in range(8):
            sizes.append(1 + 9 * sizes[-1])
        expected = 1 + (1 + 1 + sum(1 + n for n in sizes)) + 2 + (1 + sizes[-1])  # root, x: {...}, base, seed
        assert f"expands to {expected:,} YAML nodes" in str(exc)
    else:
        raise AssertionError("the alias bomb loaded")
