"""`midtrain mix search|value` end to end on a tiny model (real proxy runs through `midtrain run`'s machinery)."""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from tests.mix.toy import write_recipe
from tests.train.tiny import midtrain


@pytest.mark.slow
def test_tiny_search_trains_proxies_fits_and_resumes(tmp_path):
    recipe = write_recipe(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "search"
    args = ("mix", "search", str(recipe), "--stage", "warm", "--target", "loss.math", "--proxies", "4",
            "--tokens", "1024", "--threads", "1", "--out", str(out), "--model", "linear")
    first = midtrain(*args, cache=cache, timeout=120)
    assert "held-out Spearman" in first.stdout and "0/4 already done" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["proxies"]) == 4 and summary["cv"]["scheme"] == "leave-one-out"
    for i, p in enumerate(summary["proxies"]):
        result = json.loads((out / "proxies" / str(i) / "result.json").read_text())
        assert result["tokens"] == 1024 and math.isfinite(result["metrics"]["loss.math"])
        assert p["value"] == result["metrics"]["loss.math"]
        # the proxy trained the sampled mixture (the loader's token counts per source follow it)
        assert abs(sum(result["mixture"].values()) - 1) < 1e-5
        assert not (out / "proxies" / str(i) / "run" / "checkpoints").exists()  # results kept, weights not
    assert abs(sum(summary["mixtures"]["predicted"].values()) - 1) < 1e-9
    assert "mixture:" in (out / "best_mixture.yaml").read_text()

    t0 = time.time()  # resumed: nothing retrained
    again = midtrain(*args, cache=cache, timeout=60)
    assert "4/4 already done" in again.stdout and time.time() - t0 < 30
    assert json.loads((out / "summary.json").read_text())["proxies"] == summary["proxies"]


@pytest.mark.slow
def test_tiny_value_run_compares_candidate_and_control(tmp_path):
    recipe = write_recipe(tmp_path)
    rng = random.Random(0)
    noise = tmp_path / "noise.jsonl"
    noise.write_text("".join(json.dumps({"text": "".join(rng.choice("qzxjv kw") for _ in range(80))}) + "\n"
                             for _ in range(60)))
    cache, out = tmp_path / "cache", tmp_path / "value"
    result = midtrain("mix", "value", str(recipe), "--stage", "warm", "--candidate", str(noise), "--seeds", "1,2",
                      "--tokens", "1024", "--threads", "1", "--out", str(out), cache=cache, timeout=120)
    assert "candidate noise at 30%" in result.stdout
    summary = json.loads((out / "noise-f0.3.json").read_text())
    assert len(summary["runs"]) == 4 and summary["mixtures"]["candidate"]["noise"] == pytest.approx(0.3)
    for metric, d in summary["deltas"].items():
        per_seed = [summary["per_seed"][s]["candidate"][metric] - summary["per_seed"][s]["control"][metric]
                    for s in ("1", "2")]
        assert d["deltas"] == pytest.approx(per_seed) and d["delta"] == pytest.approx(sum(per_seed) / 2)
    # training on the noise source lowers its own held-out loss against the control, which never saw it
    assert summary["deltas"]["loss.noise"]["delta"] < 0
    for run in summary["runs"]:  # same seed, same tokens, same start in both arms
        r = json.loads((tmp_path / run["dir"] / "result.json").read_text())
        assert r["tokens"] == 1024 and r["seed"] == run["seed"] and r["base"] == "preset:tiny-llama"


@pytest.mark.slow
def test_worker_processes_train_the_same_proxy_as_in_process(tmp_path, monkeypatch):
    """The process pool (workers=2) and the in-process path give bit-equal results for one proxy recipe."""
    from midtrain.config import load_recipe
    from midtrain.mix.proxy import Proxy, derive_recipe, run_proxies

    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path))

    def proxy(name: str) -> Proxy:
        data = derive_recipe(recipe, 0, mixture={"prose": 0.5, "math": 0.25, "code": 0.25}, tokens=1024,
                             run_dir=tmp_path / name / "run", start=recipe.base, tasks=["loss"])
        return Proxy(tmp_path / name, "warm", data)

    [alone] = run_proxies([proxy("a")], workers=1, threads=1)
    pooled = run_proxies([proxy("b"), proxy("c")], workers=2, threads=1)
    assert all(r["metrics"] == alone["metrics"] for r in pooled)
    assert alone["metrics"]["loss"] < alone["before"]["loss"]
    assert "precision" in (tmp_path / "b" / "log.txt").read_text()  # a worker's output goes to its proxy's log
