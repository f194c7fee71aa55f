"""RopeSetting: parsed once (method, coerced params, traits), issues with tuple paths, the recipe form kept as written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from midtrain.context.checks import rope_issues, stage_rope_issues
from midtrain.context.methods import METHODS, RotarySpec
from midtrain.context.setting import RopeIssue, RopeSetting, RopeSettingError, parse_rope, parse_rope_issues


def test_parse_gives_method_params_and_traits():
    s = parse_rope({"method": "yarn", "factor": 4, "original_max_position_embeddings": "256", "beta_fast": 8})
    assert isinstance(s, RopeSetting) and s.form == "method" and s.method == "yarn"
    assert s.params == {"factor": 4, "original_max_position_embeddings": 256, "beta_fast": 8}
    assert s.info is METHODS["yarn"] and s.info.needs_original and s.info.length == "scaled"
    assert not METHODS["linear"].needs_original and not METHODS["linear"].reads_length
    assert METHODS["longrope"].switches_at == "original" and METHODS["dynamic"].switches_at == "max_position"
    assert METHODS["dynamic"].inference_only and not METHODS["dynamic"].factor_is_extension
    assert METHODS["ntk"].derives_theta and METHODS["ntk"].rope_type == "default"
    assert parse_rope(None) is None


def test_the_mapping_is_the_recipe_as_written():
    raw = {"method": "abf", "rope_theta": "4e4"}  # YAML reads 4e4 as a string
    s = parse_rope(raw)
    assert s == raw and dict(s) == raw and s["rope_theta"] == "4e4" and s.params["rope_theta"] == 4e4
    assert s.to_dict() == raw and s.to_dict() is not s.raw
    assert hash(s) == hash(parse_rope(dict(raw)))
    empty = parse_rope({})  # changes nothing, and says so by being falsy
    assert empty is not None and not empty and empty.method == "default"


def test_every_problem_is_reported_with_a_tuple_path():
    with pytest.raises(RopeSettingError) as info:
        parse_rope({"method": "yarn", "factor": 0.5, "beta_fast": 0, "a.b": 1}, ("stages", 2, "rope"))
    issues = info.value.issues
    assert [i.path for i in issues] == [("stages", 2, "rope", "a.b"), ("stages", 2, "rope", "factor"),
                                        ("stages", 2, "rope", "beta_fast")]  # a dotted key stays one element
    assert "must be >= 1" in issues[1].message and "silently use 32" in issues[2].message
    assert str(issues[0]).startswith("stages.2.rope.a.b: not a parameter of method 'yarn'")
    assert isinstance(info.value, ValueError)
    _, found = parse_rope_issues("yarn")
    assert found == [RopeIssue(("rope",), "expected a mapping (got 'yarn')")]
    _, found = parse_rope_issues({"method": "abf"})
    assert found[0].path == ("rope", "rope_theta") and "the new base" in found[0].message
    _, found = parse_rope_issues({"method": "yarn", "factor": 2, "beta_fast": 1, "beta_slow": 2})
    assert [i.path[-1] for i in found] == ["beta_fast"]


def test_a_transformers_dict_means_what_it_merges_into():
    s = parse_rope({"rope_theta": "5e5"})  # without a base: a plain default one, so a new base is abf
    assert s.form == "transformers" and s.method == "abf"
    on_linear = s.against({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    assert on_linear.method == "linear" and on_linear.params == {"rope_theta": 5e5, "factor": 2.0}
    same = parse_rope({"method": "linear", "factor": 2})
    assert same.against({"rope_type": "yarn"}) is same


def test_checks_use_traits_and_paths():
    spec = RotarySpec(head_dim=64, base=1e4)
    lr = parse_rope({"method": "longrope", "factor": 4, "original_max_position_embeddings": 128,
                     "short_factor": [1.0] * 16, "long_factor": [2.0] * 32})
    (short,) = [i for i in rope_issues(lr, seq_len=512, spec=spec) if i.severity == "error"]
    assert short.path == ("rope", "short_factor") and "d/2 = 32" in short.message
    dyn = parse_rope({"method": "dynamic", "factor": 4})
    assert rope_issues(dyn, training=False) == []
    assert rope_issues(dyn)[0].path == ("rope", "method")


def test_stage_rope_issues_paths_by_index_or_by_name():
    stages = [SimpleNamespace(name="short", rope=None, seq_len=128),
              SimpleNamespace(name="long", rope=parse_rope({"method": "yarn", "factor": 2}), seq_len=256)]
    errors, warnings = stage_rope_issues(stages)
    assert [p for p, _ in errors] == [("stages", 1, "rope", "original_max_position_embeddings")]
    errors, _ = stage_rope_issues(stages, by_name=True)
    assert [p for p, _ in errors] == [("stages", "long", "rope", "original_max_position_embeddings")]
    stages[1].rope = {"method": "linear", "factor": 4}  # a raw mapping is parsed on the way
    errors, warnings = stage_rope_issues(stages, RotarySpec(head_dim=64, base=1e4, original_max_position_embeddings=128))
    assert errors == [] and warnings == ["stage 'long': rope.factor: factor 4 extends L0=128 to 512 tokens, but the "
                                         "stage trains at seq_len 256 (= 2 x L0)"]

