"""midtrain's harness numbers are lm-eval's own: the same export and local tasks through `lm_eval`'s CLI (batch size
1, its default) and through `run_harness` (batched), every metric equal. One task of each lm-eval output type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from midtrain.data import byte_tokenizer
from midtrain.eval.harness import harness_metrics, include_paths, run_harness, unknown_tasks
from midtrain.eval.harness_tasks import BUILTIN

pytest.importorskip("lm_eval")
LIMIT = 24


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer as `save_pretrained` writes them."""
    out = tmp_path_factory.mktemp("export")
    tok = byte_tokenizer()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cli(export: Path, tasks: list[str], include: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
           "--tasks", ",".join(tasks), "--include_path", include[0], "--limit", str(LIMIT), "--seed", "0",
           "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = out.rglob("results_*.json")
    return json.loads(result.read_text())


@pytest.mark.slow
def test_every_metric_equals_lm_evals_own_cli(export, tmp_path):
    tasks = list(BUILTIN)
    include = include_paths(cache_dir=tmp_path / "cache")
    theirs = harness_metrics(_cli(export, tasks, include, tmp_path / "cli"))
    ours, why = run_harness(export, tasks, limit=LIMIT, batch_size=16, seed=0)
    assert why is None
    expected = {"harness.midtrain_arith_mc.acc", "harness.midtrain_arith_mc.acc_norm",
                "harness.midtrain_pydoc_ppl.word_perplexity", "harness.midtrain_pydoc_ppl.byte_perplexity",
                "harness.midtrain_pydoc_ppl.bits_per_byte", "harness.midtrain_arith_gen.exact_match"}
    assert set(theirs) == set(ours) == expected
    for key, value in theirs.items():
        if key.endswith(("acc", "acc_norm", "exact_match")):
            assert ours[key] == value, key  # accuracies: the same answers, exactly
        else:
            assert ours[key] == pytest.approx(value, rel=1e-6), key


def test_user_task_directories_are_found_and_unknown_tasks_named(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    builtin = Path(include_paths(cache_dir=tmp_path / "cache")[0])
    text = (builtin / "midtrain_arith_mc.yaml").read_text().replace("task: midtrain_arith_mc", "task: my_mc")
    (mine / "my_mc.yaml").write_text(text)
    unknown, why = unknown_tasks(["my_mc", "midtrain_arith_gen", "no_such_task"], include=[mine])
    assert why is None and unknown == ["no_such_task"]


def test_a_metric_under_several_filters_keeps_each_filter():
    result = {"results": {"gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                                    "exact_match,flexible-extract": 0.2, "alias": "gsm8k"},
                          "arc": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}
    assert harness_metrics(result) == {"harness.gsm8k.exact_match_strict-match": 0.1,
                                       "harness.gsm8k.exact_match_flexible-extract": 0.2, "harness.arc.acc": 0.5}


def test_recipe_check_names_a_harness_task_lm_eval_does_not_know(tmp_path):
    from midtrain.config import load_recipe
    from midtrain.plan import build_plan
    from midtrain.run import preflight

    from ..train.tiny import write_recipe

    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace(
        "eval: {max_docs: 4}",
        "eval: {max_docs: 4, tasks: [loss, 'harness:midtrain_arith_mc', 'harness:no_such_task']}"))
    recipe = load_recipe(path)
    [problem] = preflight(recipe, build_plan(recipe)).problems
    assert problem.field == "stages.anneal.eval.tasks" and "'no_such_task'" in problem.message


def test_a_gate_on_a_harness_metric_that_did_not_run_fails_with_the_reason():
    from midtrain.eval.gates import evaluate_gate

    why = "lm-evaluation-harness is not installed (pip install 'midtrain[lm-eval]'); harness tasks ['arc'] not run"
    [result] = evaluate_gate({"harness.arc.acc": ">= 0.3"}, {"loss": 2.0}, skipped={"harness": why})
    assert not result.passed and result.value is None and why in result.reason


@pytest.mark.slow
def test_a_stage_records_harness_metrics_before_and_after_and_the_report_shows_them(tmp_path, monkeypatch):
    """Through `midtrain run`: the anneal stage's before- and after-evals hold lm-eval's metrics, a gate reads them,
    and the report's before/after table lists them."""
    import torch as _torch

    from midtrain.config import load_recipe
    from midtrain.report import write_report
    from midtrain.run import RunOptions, run

    from ..train.tiny import write_recipe

    path = write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=1024)
    path.write_text(path.read_text().replace(
        "eval: {max_docs: 4}",
        "eval: {max_docs: 4, tasks: [loss, 'harness:midtrain_arith_mc'], harness: {limit: 12}}\n"
        "    gate: {harness.midtrain_arith_mc.acc: '>= 0'}"))
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    threads = _torch.get_num_threads()
    try:
        run(load_recipe(path, [f"run_dir={tmp_path / 'run'}"]), RunOptions(progress=False, threads=2))
    finally:
        _torch.set_num_threads(threads)
    evals = tmp_path / "run" / "eval"
    before, after = (json.loads((evals / name).read_text()) for name in ("anneal-before.json", "anneal.json"))
    for record in (before, after):
        assert 0 <= record["metrics"]["harness.midtrain_arith_mc.acc"] <= 1
    assert after["gate"]["passed"] and after["gate"]["conditions"][0]["value"] is not None
    report = write_report(tmp_path / "run").read_text()
    assert "harness.midtrain_arith_mc.acc" in report
