"""MetricKey: parse / str round-trip of every key the evaluations write, and malformed keys refused."""

from __future__ import annotations

import pytest

from midtrain.eval.keys import MetricKey

CANONICAL = {
    "loss": MetricKey("loss"),
    "ppl": MetricKey("ppl"),
    "arith": MetricKey("arith"),
    "loss.math": MetricKey("loss", domain="math"),
    "ppl.general": MetricKey("ppl", domain="general"),
    "loss.web.en": MetricKey("loss", domain="web.en"),  # a domain may hold dots: everything after `loss.`
    "passkey@1024": MetricKey("passkey", 1024),
    "niah@512": MetricKey("niah", 512),
    "ppl@2048": MetricKey("ppl", 2048),
    "loss@2048": MetricKey("loss", 2048),
    "ruler@512": MetricKey("ruler", 512),
    "ruler.vt@512": MetricKey("ruler.vt", 512),
    "harness.hellaswag.acc": MetricKey("harness.hellaswag.acc"),
    "harness.humaneval.pass@1": MetricKey("harness.humaneval.pass@1"),  # lm-eval's name, not a length
}


@pytest.mark.parametrize("text", list(CANONICAL))
def test_parse_and_str_round_trip(text):
    key = MetricKey.parse(text)
    assert key == CANONICAL[text]
    assert str(key) == text
    assert MetricKey.parse(str(key)) == key


def test_parts_family_and_direction():
    vt = MetricKey.parse("ruler.vt@512")
    assert (vt.task, vt.length, vt.domain, vt.family, vt.variant) == ("ruler.vt", 512, None, "ruler", "vt")
    math_loss = MetricKey.parse("loss.math")
    assert (math_loss.task, math_loss.length, math_loss.domain) == ("loss", None, "math")
    assert math_loss.lower_is_better and MetricKey.parse("ppl@1024").lower_is_better
    assert not MetricKey.parse("passkey@1024").lower_is_better
    assert not MetricKey.parse("harness.arc.acc").lower_is_better
    assert MetricKey.parse("harness.arc.acc").family == "harness"


@pytest.mark.parametrize("text", [
    "", "@1024", "passkey@", "passkey@abc", "passkey@0", "passkey@-5", "passkey@1.5", "passkey@1@2", "passkey@²",
    "loss.", "ruler.@512", ".loss", "a..b", "harness.", None, 5,
])
def test_malformed_keys_are_refused(text):
    with pytest.raises(ValueError):
        MetricKey.parse(text)
    assert MetricKey.try_parse(text) is None


@pytest.mark.parametrize("kwargs", [
    {"task": ""},
    {"task": "passkey", "domain": "math"},  # only loss and ppl have domains
    {"task": "loss.math"},  # the domain goes in `domain`, or str() would not round-trip
    {"task": "loss", "domain": "a@b"},
    {"task": "loss", "domain": ""},
    {"task": "passkey", "length": 0},
    {"task": "passkey", "length": True},
    {"task": "pass@key"},
    {"task": "harness.arc.acc", "length": 512},
])
def test_constructor_keeps_keys_round_trippable(kwargs):
    with pytest.raises(ValueError):
        MetricKey(**kwargs)
