"""A stage with `convert` end to end: drift logged, loss recovered, MoE aux loss trained, resume without re-converting."""

from __future__ import annotations

import json
import shutil

import pytest

import midtrain.model.convert as convert_module
from midtrain.config import load_recipe
from midtrain.run import RunError, RunOptions, run
from tests.test_contracts import documented_metric_key

from .tiny import train_rows, write_recipe

pytestmark = pytest.mark.slow

# The anneal stage continues the warm stage's data at a constant LR, so any loss change is the conversion's.
CONTINUE = ["stages.anneal.data.mixture={prose: 1}", "stages.anneal.start_lr=null",
            "stages.anneal.schedule={kind: constant, peak_lr: 1e-3}"]


def _eval_loss(run_dir, name: str) -> float:
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())["metrics"]["loss"]


def _rows(run_dir, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def test_gqa_stage_recovers_the_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=48 * 512, anneal_tokens=24 * 512, every=10**9),
                         [f"run_dir={run_dir}", "stages.anneal.convert={kind: gqa, num_key_value_heads: 1}",
                          *CONTINUE])
    run(recipe, RunOptions(progress=False))
    (convert,) = _rows(run_dir, "convert")
    assert convert["kind"] == "gqa" and convert["changed_params"] == 4 and convert["rel_logits_error"] > 0.01
    pre, converted, after = (_eval_loss(run_dir, n) for n in ("warm", "anneal-before", "anneal"))
    assert converted > pre  # pooling 2 heads into 1 costs something on held-out data...
    assert after <= converted  # ...that continued training wins back
    assert after <= pre + 0.02  # to (about) where the dense model was
    config = json.loads((run_dir / "stages" / "anneal" / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2


def test_moe_stage_trains_with_the_aux_loss_and_resumes_without_converting_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}",
                 "stages.anneal.convert={kind: moe, num_experts: 4, top_k: 2, router_aux_loss_coef: 0.1}"]
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=4096, anneal_tokens=8 * 512, every=1024), overrides)
    run(recipe, RunOptions(progress=False))
    (convert,) = _rows(run_dir, "convert")
    assert convert["rel_logits_error"] < 1e-6 and convert["loss_after"] == pytest.approx(convert["loss_before"])
    expected = train_rows(run_dir)
    anneal = [r for r in expected if r["stage"] == "anneal"]
    # coef x Switch loss, which is top_k (2) when routing is balanced and up to num_experts (4) when it collapses
    assert all(0.1 * 2 * 0.95 <= r["aux_loss"] <= 0.1 * 4 for r in anneal)
    assert all("aux_loss" not in r for r in expected if r["stage"] == "warm")
    assert all(documented_metric_key(k) for r in [convert, *anneal] for k in r)  # docs/CONTRACTS.md §3
    config = json.loads((run_dir / "stages" / "anneal" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4

    # Lose the end of the stage (export, after-eval, last checkpoints): the re-run resumes from its own checkpoint.
    final = max(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints" / "anneal").glob("step-*"))
    shutil.rmtree(run_dir / "stages" / "anneal")
    (run_dir / "eval" / "anneal.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "anneal" / f"step-{final}")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("a resumed stage must load its converted checkpoint, not convert again")

    monkeypatch.setattr(convert_module, "convert_model", no_second_conversion)
    run(recipe, RunOptions(progress=False))
    assert _rows(run_dir, "resume")[-1]["step"] < final
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]  # bit for bit, aux loss included
    assert [r.get("aux_loss") for r in rows] == [r.get("aux_loss") for r in expected]


def test_conversion_that_does_not_fit_the_base_fails_at_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path), [f"run_dir={tmp_path / 'run'}",
                                                  "stages.anneal.convert={kind: gqa, num_key_value_heads: 3}"])
    with pytest.raises(RunError, match=r"stages.anneal.convert: num_key_value_heads must divide num_attention_heads"):
        run(recipe, RunOptions(progress=False))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
