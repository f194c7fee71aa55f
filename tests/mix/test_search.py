"""Proxy recipes, resume, errors and the search pipeline with a stand-in trainer (no torch training here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from midtrain.config import load_recipe
from midtrain.config.recipe import DataConfig
from midtrain.io import write_json_atomic
from midtrain.mix import proxy as proxy_mod
from midtrain.mix.proxy import MixError, MixRunError, derive_recipe, stage_start
from midtrain.mix.search import SearchConfig, run_search
from tests.mix.toy import write_recipe

OPT = {"prose": 0.2, "math": 0.5, "code": 0.3}


@pytest.fixture
def recipe_file(tmp_path):
    path = write_recipe(tmp_path)
    text = path.read_text().replace("run_dir", "x")  # no run_dir: set one under tmp
    path.write_text(f"run_dir: {tmp_path / 'run'}\n" + text)
    return path


def fake_trainer(calls: list):
    """Stands in for a proxy run: loss.math = a bowl with its minimum at OPT (an oracle the search must find)."""

    def train(proxy_dir, stage, *, keep_models=False, console=None):
        data = yaml.safe_load((proxy_dir / "recipe.yaml").read_text())
        mix = data["stages"][0]["data"]["mixture"]
        total = sum(mix.values())
        w = np.array([mix.get(k, 0.0) / total for k in OPT])
        loss = float(1.0 + ((w - np.array(list(OPT.values()))) ** 2).sum())
        calls.append(proxy_dir.name)
        result = {"stage": stage, "mixture": mix, "tokens": data["stages"][0]["tokens"], "seed": data["seed"],
                  "metrics": {"loss.math": loss, "loss": loss}, "before": {}, "seconds": 0.0}
        write_json_atomic(proxy_dir / "result.json", result)
        return result

    return train


def test_derived_recipe_is_the_stage_alone_with_the_new_mixture_and_budget(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    data = derive_recipe(recipe, 1, mixture={"prose": 0.5, "math": 0.5}, tokens=1024, run_dir=tmp_path / "p",
                         start="preset:tiny-llama", seed=9, tasks=["loss"])
    stage = data["stages"][0]
    assert [s["name"] for s in data["stages"]] == ["anneal"]
    # the new mixture, every other data option as the recipe had it (here: defaults)
    expected = DataConfig(mixture={"prose": 0.5, "math": 0.5}).model_dump(mode="json")
    assert stage["data"] == expected and expected["replay"] is None
    assert stage["tokens"] == 1024 and stage["init"] == "scratch" and stage["start_lr"] is None
    assert stage["schedule"]["peak_lr"] == pytest.approx(3e-3)  # from_previous resolved: the warm stage's LR
    assert data["seed"] == 9 and data["base"] == "preset:tiny-llama" and stage["gate"] == {}
    # the warm stage's warm-up scales with the budget: 1024 of 4096 tokens -> 256 of 1024
    warm = derive_recipe(recipe, 0, mixture={"prose": 1.0}, tokens=1024, run_dir=tmp_path / "q",
                         start=recipe.base)
    assert warm["stages"][0]["schedule"]["warmup_tokens"] == 256 and warm["stages"][0]["init"] == "scratch"
    path = tmp_path / "derived.yaml"  # it is a valid recipe
    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).stages[0].data.mixture == {"prose": 0.5, "math": 0.5}


def test_stage_start_needs_the_previous_stage_export(recipe_file):
    recipe = load_recipe(recipe_file)
    assert stage_start(recipe, 0) == "preset:tiny-llama"
    with pytest.raises(MixError, match="stage 'warm''s export .* does not exist yet"):
        stage_start(recipe, 1)
    with pytest.raises(MixError, match="no config.json"):
        stage_start(recipe, 1, start=str(recipe_file.parent))


def test_search_finds_the_oracle_minimum_and_resumes(recipe_file, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(proxy_mod, "train_proxy", fake_trainer(calls))
    recipe = load_recipe(recipe_file)
    out = tmp_path / "search"
    cfg = SearchConfig(stage="anneal", target="loss.math", proxies=24, tokens=1024, start="preset:tiny-llama",
                       concentration=4.0, candidates=20_000, top_k=20)
    summary = run_search(recipe, recipe_file, cfg, out)
    assert len(calls) == 24
    # the centre is the anneal's effective mixture: 0.75 * own + 0.25 * the warm stage's
    assert summary["mixtures"]["recipe"] == pytest.approx({"prose": 0.575, "code": 0.375, "math": 0.05})
    assert summary["cv"]["spearman"] > 0.95
    best = summary["mixtures"]["predicted"]
    assert max(abs(best[k] - OPT[k]) for k in OPT) < 0.08
    assert summary["predicted_value"]["predicted"] < summary["predicted_value"]["recipe"]
    snippet = yaml.safe_load((out / "best_mixture.yaml").read_text())
    assert snippet["data"]["replay"] is None and set(snippet["data"]["mixture"]) == set(OPT)
    assert json.loads((out / "summary.json").read_text())["cv"] == summary["cv"]

    calls.clear()  # a re-run trains nothing
    assert run_search(recipe, recipe_file, cfg, out)["proxies"] == summary["proxies"]
    assert calls == []
    (out / "proxies" / "5" / "result.json").unlink()  # a lost result is trained again, alone
    run_search(recipe, recipe_file, cfg, out)
    assert calls == ["5"]
    calls.clear()  # more proxies: the first 24 are kept
    bigger = run_search(recipe, recipe_file, SearchConfig(**{**cfg.__dict__, "proxies": 26}), out)
    assert calls == ["24", "25"]
    assert [(p["mixture"], p["value"]) for p in bigger["proxies"][:24]] == [
        (p["mixture"], p["value"]) for p in summary["proxies"]]
    with pytest.raises(MixRunError, match="other settings .*concentration"):
        run_search(recipe, recipe_file, SearchConfig(**{**cfg.__dict__, "concentration": 9.0}), out)


def test_clear_errors_for_unknown_stage_metric_and_bad_options(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    base = dict(stage="anneal", target="loss.math", proxies=4, start="preset:tiny-llama")
    with pytest.raises(MixError, match="no stage 'nope' \\(stages: warm, anneal\\)"):
        run_search(recipe, recipe_file, SearchConfig(**{**base, "stage": "nope"}), tmp_path / "o")
    with pytest.raises(MixError, match="--target loss.poetry: .*unknown domain 'poetry'"):
        run_search(recipe, recipe_file, SearchConfig(**{**base, "target": "loss.poetry"}), tmp_path / "o")
    with pytest.raises(MixError, match="--target arith: .*needs 'arith' in eval.tasks"):
        run_search(recipe, recipe_file, SearchConfig(**{**base, "target": "arith"}), tmp_path / "o")
    with pytest.raises(MixError, match="--tokens 100: less than one batch"):
        run_search(recipe, recipe_file, SearchConfig(**{**base, "tokens": 100}), tmp_path / "o")
    with pytest.raises(MixError, match="at least 3"):
        SearchConfig(**{**base, "proxies": 2})
    single = load_recipe(recipe_file, ["stages.warm.data.mixture={prose: 1}"])
    with pytest.raises(MixError, match="mixes one source"):
        run_search(single, recipe_file, SearchConfig(stage="warm", target="loss", proxies=4), tmp_path / "o")


def test_a_souped_stage_gives_single_branch_proxies(recipe_file, tmp_path):
    from midtrain.config import Stage

    if "seeds" not in Stage.model_fields:
        pytest.skip("this checkout has no stage seeds (souping)")
    recipe = load_recipe(recipe_file, ["stages.anneal.seeds=[1, 2]"])
    data = derive_recipe(recipe, 1, mixture={"prose": 1.0}, tokens=1024, run_dir=tmp_path / "p",
                         start="preset:tiny-llama")
    assert data["stages"][0]["seeds"] is None
    path = tmp_path / "derived.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).stages[0].seeds is None
