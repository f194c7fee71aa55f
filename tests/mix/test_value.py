"""Microanneal valuation with a stand-in trainer: mixtures, deltas over seeds, reuse of identical anneals, errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from midtrain.config import load_recipe
from midtrain.io import write_json_atomic
from midtrain.mix import proxy as proxy_mod
from midtrain.mix.proxy import MixError
from midtrain.mix.value import ValueConfig, candidate_mixture, run_value
from tests.mix.toy import write_recipe


@pytest.fixture
def recipe_file(tmp_path):
    path = write_recipe(tmp_path)
    path.write_text(f"run_dir: {tmp_path / 'run'}\n" + path.read_text())
    return path


def fake_trainer(calls: list):
    """loss.math falls with the math share (-1 per unit), plus a seed effect shared by both arms; arith rises."""

    def train(proxy_dir, stage, *, keep_models=False, console=None):
        data = yaml.safe_load((proxy_dir / "recipe.yaml").read_text())
        mix = data["stages"][0]["data"]["mixture"]
        share = mix.get("math", 0.0) / sum(mix.values())
        seed = data["seed"]
        metrics = {"loss.math": 3.0 - share + 0.1 * seed, "arith": 0.2 + share * seed,
                   "loss.general": 2.0 + 0.01 * seed}
        for s in data["sources"]:  # a new source is evaluated in both arms
            metrics.setdefault(f"loss.{s.get('domain') or s['name']}", 4.0)
        calls.append(proxy_dir.name)
        result = {"stage": stage, "mixture": mix, "tokens": data["stages"][0]["tokens"], "seed": seed,
                  "metrics": metrics, "before": {}, "seconds": 0.0}
        write_json_atomic(proxy_dir / "result.json", result)
        return result

    return train


def test_candidate_mixture_takes_its_fraction_and_scales_the_rest():
    assert candidate_mixture({"a": 0.6, "b": 0.4}, "c", 0.3) == pytest.approx({"a": 0.42, "b": 0.28, "c": 0.3})
    # a source already in the mix gets its scaled share plus the fraction
    assert candidate_mixture({"a": 3.0, "b": 1.0}, "b", 0.2) == pytest.approx({"a": 0.6, "b": 0.4})


def test_value_reports_deltas_over_seeds_and_reuses_identical_anneals(recipe_file, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(proxy_mod, "train_proxy", fake_trainer(calls))
    recipe = load_recipe(recipe_file)
    out = tmp_path / "value"
    cfg = ValueConfig(stage="anneal", candidate="math", fraction=0.3, seeds=(1, 2, 3), tokens=1024,
                      start="preset:tiny-llama")
    summary = run_value(recipe, recipe_file, cfg, out)
    assert len(calls) == 6
    control = summary["mixtures"]["control"]  # effective: 0.75 * (0.6, 0.4) + 0.25 * warm (0.5, 0.2, 0.3)
    assert control == pytest.approx({"prose": 0.575, "code": 0.375, "math": 0.05})
    assert summary["mixtures"]["candidate"]["math"] == pytest.approx(0.7 * 0.05 + 0.3)
    d = summary["deltas"]["loss.math"]
    assert d["delta"] == pytest.approx(-0.3 * (1 - 0.05)) and d["delta_std"] == pytest.approx(0, abs=1e-12)
    assert d["higher_is_better"] is False and d["control"] == pytest.approx(3.0 - 0.05 + 0.2)
    a = summary["deltas"]["arith"]  # delta = 0.285 * seed: mean 0.57, std 0.285 (ddof 1)
    assert a["deltas"] == pytest.approx([0.285, 0.57, 0.855])
    assert a["delta"] == pytest.approx(0.57) and a["delta_std"] == pytest.approx(np.std([1, 2, 3], ddof=1) * 0.285)
    assert summary["deltas"]["loss.general"]["delta"] == pytest.approx(0.0)
    assert (out / "math-f0.3.json").is_file()

    calls.clear()  # another candidate: the control anneals are found again
    run_value(recipe, recipe_file, ValueConfig(**{**cfg.__dict__, "candidate": "prose"}), out)
    assert len(calls) == 3 and all(c.startswith("prose-f0.3-") for c in calls)


def test_a_new_path_becomes_a_source_with_its_domain(recipe_file, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(proxy_mod, "train_proxy", fake_trainer(calls))
    noise = tmp_path / "noise.jsonl"
    noise.write_text('{"text": "qzx vvk"}\n' * 20)
    cfg = ValueConfig(stage="anneal", candidate=str(noise), seeds=(1,), tokens=1024, start="preset:tiny-llama",
                      domain="junk")
    summary = run_value(load_recipe(recipe_file), recipe_file, cfg, tmp_path / "v")
    assert summary["candidate"] == {"name": "noise", "new_source": True, "domain": "junk"}
    assert summary["mixtures"]["candidate"]["noise"] == pytest.approx(0.3)
    assert "loss.junk" in summary["deltas"]  # both arms evaluate the new domain
    recipes = [yaml.safe_load((tmp_path / "v" / "runs" / c / "recipe.yaml").read_text()) for c in calls]
    assert all(r["sources"][-1]["name"] == "noise" for r in recipes)


def test_value_errors(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    base = dict(stage="anneal", candidate="math", seeds=(1,), tokens=1024, start="preset:tiny-llama")
    with pytest.raises(MixError, match="--candidate poetry: neither a source of the recipe \\(sources: prose, "
                                       "math, code\\) nor an existing file"):
        run_value(recipe, recipe_file, ValueConfig(**{**base, "candidate": "poetry"}), tmp_path / "o")
    with pytest.raises(MixError, match="no stage 'cooldown'"):
        run_value(recipe, recipe_file, ValueConfig(**{**base, "stage": "cooldown"}), tmp_path / "o")
    clash = tmp_path / "math.jsonl"  # the toy corpus' own file: its name is taken
    with pytest.raises(MixError, match="already has a source named 'math'; pass --name"):
        run_value(recipe, recipe_file, ValueConfig(**{**base, "candidate": str(clash)}), tmp_path / "o")
    with pytest.raises(MixError, match="--fraction 1.0"):
        ValueConfig(**{**base, "fraction": 1.0})
    with pytest.raises(MixError, match="repeat"):
        ValueConfig(**{**base, "seeds": (1, 1)})
    with pytest.raises(MixError, match="starts from stage 'warm''s export"):
        run_value(recipe, recipe_file, ValueConfig(**{**base, "start": None}), tmp_path / "o")
