"""SIGKILL a run after checkpoint k > 0 exists; re-running resumes from k and reproduces every loss bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .tiny import midtrain, train_rows, write_recipe

pytestmark = pytest.mark.slow

# 16 warm + 8 anneal steps of 2048 tokens; a checkpoint every 2 steps: slow enough to kill in flight.
SIZES = dict(warm_tokens=16 * 2048, anneal_tokens=8 * 2048, every=2 * 2048)
BATCH = ["--set", "stages.warm.batch.tokens=2048", "--set", "stages.anneal.batch.tokens=2048"]


def _start(recipe: Path, run_dir: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "MIDTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "midtrain", "run", str(recipe), "--set", f"run_dir={run_dir}", *BATCH],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def _kill_after_checkpoint(proc: subprocess.Popen, ckpt_root: Path, min_step: int, timeout: float = 240) -> int:
    """SIGKILLs the run as soon as a complete checkpoint with step >= min_step exists; returns that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed:\n{proc.stderr.read().decode()[-3000:]}")
        names = [p.parent.name for p in ckpt_root.glob("step-*/manifest.json")]
        steps = sorted(int(n.removeprefix("step-")) for n in names if n.removeprefix("step-").isdigit())
        steps = [s for s in steps if s >= min_step]
        if steps:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return steps[0]
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    recipe = write_recipe(root, **SIZES)
    midtrain("run", str(recipe), "--set", f"run_dir={root / 'out'}", *BATCH, cache=root / "cache")
    return recipe, root / "cache", train_rows(root / "out")


@pytest.mark.parametrize("stage,min_step", [("warm", 2), ("anneal", 18)])
def test_kill_and_resume_reproduces_the_uninterrupted_losses(reference, tmp_path, stage, min_step):
    recipe, cache, expected = reference
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir, cache)
    killed_at = _kill_after_checkpoint(proc, run_dir / "checkpoints" / stage, min_step)
    assert killed_at < len(expected), "the kill must land before the run's end"

    result = midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", *BATCH, cache=cache)
    assert f"resumed stage '{stage}' from step" in result.stdout
    resumed_from = int(result.stdout.split(f"resumed stage '{stage}' from step ")[1].split()[0])
    assert resumed_from >= killed_at > 0

    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]  # nothing duplicated, nothing missing
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]  # bit for bit
    assert [r["lr"] for r in rows] == [r["lr"] for r in expected]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in expected]
    events = [json.loads(l)["event"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resume") == 1


def test_corrupted_checkpoint_is_a_clear_error(reference, tmp_path):
    recipe, cache, _ = reference
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir, cache)
    step = _kill_after_checkpoint(proc, run_dir / "checkpoints" / "warm", 2)
    # The newest complete checkpoint is the one a resume would load (one may have landed after the poll).
    complete = [p.parent for p in (run_dir / "checkpoints" / "warm").glob("step-*/manifest.json")]
    latest = max((p for p in complete if p.name.removeprefix("step-").isdigit()),
                 key=lambda p: int(p.name.removeprefix("step-")))
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", *BATCH, cache=cache, check=False)
    assert step > 0 and result.returncode == 1
    assert "checksum mismatch" in result.stderr and "model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr


def test_incomplete_checkpoint_dirs_are_never_loaded(reference, tmp_path):
    """A checkpoint directory without its manifest (killed mid-write) is ignored; the run starts over cleanly."""
    recipe, cache, expected = reference
    run_dir = tmp_path / "run"
    fake = run_dir / "checkpoints" / "warm" / "step-6"
    fake.mkdir(parents=True)
    (fake / "model.safetensors").write_bytes(b"partial")
    result = midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", *BATCH, cache=cache)
    assert "resumed" not in result.stdout
    assert [r["loss"] for r in train_rows(run_dir)] == [r["loss"] for r in expected]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stderr.read().decode()[-3000:]}")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r.get("event") == "train" and r["step"] >= step
                                    for r in map(json.loads, metrics.read_text().splitlines()[:-1])):
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"step {step} not reached in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_exits_75_and_resumes_exactly(reference, tmp_path, sig):
    recipe, cache, expected = reference
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir, cache)
    _wait_for_step(proc, run_dir, 3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr.decode()[-2000:]
    assert f"stopped by {sig.name} at step" in stderr.decode() and "Traceback" not in stderr.decode()
    stopped = int(stderr.decode().split("at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / "warm" / f"step-{stopped}" / "manifest.json").is_file()
    assert not (run_dir / ".midtrain.lock").exists()  # released on the way out

    result = midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", *BATCH, cache=cache)
    assert f"resumed stage 'warm' from step {stopped}" in result.stdout
    assert [r["loss"] for r in train_rows(run_dir)] == [r["loss"] for r in expected]  # bit for bit
