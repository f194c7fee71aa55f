"""Gate syntax, evaluation against before/after metrics, and recipe-time validation with field paths."""

from __future__ import annotations

import pytest

from midtrain.config import RecipeError, load_recipe
from midtrain.eval.gates import Condition, evaluate_gate, metric_problem, parse_condition


@pytest.mark.parametrize("text,expected", [
    (">= 0.9", Condition(">=", 0.9, False)),
    ("<= +3%", Condition("<=", 3.0, True)),
    ("< -1.5%", Condition("<", -1.5, True)),
    ("==1", Condition("==", 1.0, False)),
    (" > 2e-3 ", Condition(">", 0.002, False)),
])
def test_parse_condition(text, expected):
    assert parse_condition(text) == expected


@pytest.mark.parametrize("text", ["0.9", ">= ", "=> 0.9", ">= 3%%", ">= abc", "about 3%"])
def test_bad_conditions_are_rejected(text):
    with pytest.raises(ValueError, match="cannot parse condition"):
        parse_condition(text)


def test_relative_and_absolute_conditions():
    gate = {"passkey@1024": ">= 0.9", "ppl.general": "<= +3%", "loss.math": "< -1%"}
    before = {"ppl.general": 10.0, "loss.math": 2.0, "passkey@1024": 0.1}
    ok = evaluate_gate(gate, {"passkey@1024": 0.95, "ppl.general": 10.29, "loss.math": 1.97}, before)
    assert [r.passed for r in ok] == [True, True, True]
    assert ok[1].threshold == pytest.approx(10.3) and ok[2].threshold == pytest.approx(1.98)
    bad = evaluate_gate(gate, {"passkey@1024": 0.5, "ppl.general": 10.31, "loss.math": 1.99}, before)
    assert [r.passed for r in bad] == [False, False, False]
    assert bad[1].reason == "ppl.general <= +3%: got 10.31 (before 10, limit 10.3) -> FAILED"


def test_missing_metrics_fail_with_a_reason():
    (missing,) = evaluate_gate({"niah@256": ">= 0.5"}, {})
    assert not missing.passed and "not measured" in missing.reason
    (no_before,) = evaluate_gate({"ppl": "<= +3%"}, {"ppl": 5.0}, {})
    assert not no_before.passed and "before-eval" in no_before.reason
    (nan,) = evaluate_gate({"ppl": "<= 9"}, {"ppl": float("nan")})
    assert not nan.passed


def test_metric_names_are_checked_against_tasks_lengths_and_domains():
    tasks, lengths, domains = ["loss", "ppl", "passkey", "ruler.vt"], [512, 1024], ["general", "math"]
    for ok in ["passkey@1024", "ppl.general", "loss", "ppl@512", "loss@1024", "ruler.vt@512", "ruler@512"]:
        assert metric_problem(ok, tasks, lengths, domains) is None, ok
    assert "not one of eval.lengths" in metric_problem("passkey@2048", tasks, lengths, domains)
    assert "needs 'niah'" in metric_problem("niah@512", tasks, lengths, domains)
    assert "unknown domain 'code'" in metric_problem("ppl.code", tasks, lengths, domains)
    assert "unknown metric 'accuracy'" in metric_problem("accuracy", tasks, lengths, domains)
    assert "unknown metric 'ruler.qa@512'" in metric_problem("ruler.qa@512", tasks, lengths, domains)
    assert "needs 'ruler' or 'ruler.cwe'" in metric_problem("ruler.cwe@512", tasks, lengths, domains)
    assert "needs 'arith'" in metric_problem("arith", tasks, lengths, domains)


RECIPE = """\
base: preset:tiny-llama
tokenizer: bytes
sources:
  - {{name: prose, path: prose.txt, domain: general}}
stages:
  - name: long
    tokens: 1024
    seq_len: 64
    batch: {{tokens: 512}}
    schedule: {{kind: constant, peak_lr: 1e-3}}
    data: {{mixture: {{prose: 1}}}}
    eval: {eval}
    gate: {gate}
"""


def _load(tmp_path, eval_: str, gate: str):
    (tmp_path / "prose.txt").write_text("hello world\n")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(eval=eval_, gate=gate))
    return load_recipe(path)


def test_recipe_check_reports_gate_and_task_problems_at_their_field(tmp_path):
    recipe = _load(tmp_path, "{tasks: [loss, passkey], lengths: [256]}", '{passkey@256: ">= 0.9", ppl: "<= +3%"}')
    assert recipe.stages[0].gate["passkey@256"] == ">= 0.9"
    with pytest.raises(RecipeError) as info:
        _load(tmp_path, "{tasks: [loss, passkey, nope], lengths: [256]}",
              '{passkey@512: ">= 0.9", ppl.general: "about 3%", ppl.code: "<= 5"}')
    lines = str(info.value).splitlines()
    assert any(":12: stages.long.eval.tasks.2: unknown task 'nope'" in line for line in lines), lines
    assert any(":13: stages.long.gate.passkey@512:" in line and "not one of eval.lengths [256]" in line
               for line in lines), lines
    assert any("stages.long.gate.ppl.general: cannot parse condition 'about 3%'" in line for line in lines), lines
    assert any("stages.long.gate.ppl.code:" in line and "unknown domain 'code'" in line for line in lines), lines
    with pytest.raises(RecipeError, match=r"stages.long.eval.lengths: required by tasks \['passkey'\]"):
        _load(tmp_path, "{tasks: [passkey]}", "{}")
