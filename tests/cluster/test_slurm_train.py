"""Training under Slurm with preemption, through the sbatch template users copy (scripts/midtrain.sbatch, verbatim).

One job trains the tiny two-stage recipe (torchrun, 1 node, 1 gloo rank) and is preempted twice mid-stage, once on
each path the template handles: `scontrol requeue` (Slurm's SIGTERM to every process, Slurm requeues) and the
time-limit warning (SIGUSR1 to the batch shell, which passes it to the ranks and requeues the job itself). Slurm
brings the job back each time, `midtrain run` resumes from the checkpoint written on the signal, and the per-step
losses equal an uninterrupted run's bit for bit. While the job runs, a second allocation of the same run fails on the
run dir's lock instead of writing beside it.

Run locally: `apt-get install -y slurm-wlm munge`, then `pytest -m slurm tests/cluster` (the fixture starts and stops
the cluster; this file takes about a minute and a half on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from midtrain.layout import LOCK_FILE
from tests.train.tiny import midtrain, train_rows, write_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TEMPLATE = Path(__file__).resolve().parents[2] / "scripts" / "midtrain.sbatch"
# 32 warm + 8 anneal steps of 2048 tokens, a checkpoint every 2 steps: ~10 s of training on 2 cores, long enough
# for two preemptions mid-stage (the test polls metrics.jsonl every 0.2 s and the signals arrive within a step or two).
SIZES = dict(warm_tokens=32 * 2048, anneal_tokens=8 * 2048, every=2 * 2048)
BATCH = ["--set", "stages.warm.batch.tokens=2048", "--set", "stages.anneal.batch.tokens=2048"]


def sbatch(recipe: Path, run_dir: Path, cache: Path, log: Path) -> str:
    """Submit the template as a user would; one CPU per job, so a second job of the same run can start beside it."""
    env = {**os.environ, "MIDTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           # the job finds torchrun and this Python the way the user's shell does: on PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={log}", str(TEMPLATE), str(recipe),
                          "--set", f"run_dir={run_dir}", *BATCH],
                         capture_output=True, text=True, env=env, cwd=recipe.parent, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); the controller keeps ended jobs a while."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(what: str, predicate, log: Path, timeout: float = 120.0, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no job log)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job log {log}:\n{tail}")


def steps_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[:-1]]  # the last line may be half-written
    return max((r["step"] for r in rows if r.get("event") == "train"), default=0)


def running(job_id: str, restarts: int) -> bool:
    info = job(job_id)
    return info["JobState"] == "RUNNING" and int(info["Restarts"]) == restarts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-train")
    recipe = write_recipe(root, **SIZES)
    midtrain("run", str(recipe), "--set", f"run_dir={root / 'reference'}", *BATCH, cache=root / "cache")
    return recipe, root / "cache", [r["loss"] for r in train_rows(root / "reference")]


def test_preempted_job_is_requeued_and_resumes_bit_for_bit(reference, slurm_cluster):
    recipe, cache, expected = reference
    root = recipe.parent
    run_dir, log = root / "on-slurm", root / "job.out"
    job_id = sbatch(recipe, run_dir, cache, log)

    # A second allocation of the same run while the first holds the run dir: refused by the lock, not requeued, the
    # first undisturbed. The first is suspended meanwhile (SIGSTOP: its processes, and so its lock, stay alive), so
    # that the second, which takes seconds to start, surely meets it however fast the tiny run trains.
    wait_for("the first training step", lambda: steps_done(run_dir) >= 1, log)
    subprocess.run(["scontrol", "suspend", job_id], check=True)
    second_log = root / "second.out"
    second = sbatch(recipe, run_dir, cache, second_log)
    wait_for("the second job to end", lambda: job(second)["JobState"] in ("FAILED", "COMPLETED"), second_log)
    assert job(second)["JobState"] == "FAILED"
    second_out = " ".join(second_log.read_text().split())
    assert f"{run_dir} is in use by pid" in second_out and "two runs must not write one run dir" in second_out
    subprocess.run(["scontrol", "resume", job_id], check=True)
    assert running(job_id, 0), "the second allocation disturbed the first"

    # Preemption by the scheduler (or an admin): `scontrol requeue` -> SIGTERM -> checkpoint, exit 75, requeued.
    wait_for("step 3", lambda: steps_done(run_dir) >= 3, log)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for("the job to come back", lambda: running(job_id, 1), log, timeout=90)

    # The time-limit warning (`--signal=B:USR1@...` sends it to the batch shell only): the script passes it on to
    # the ranks, and requeues the job once they have checkpointed.
    first_stop = steps_done(run_dir)
    wait_for("progress after the first requeue", lambda: steps_done(run_dir) >= first_stop + 2, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for("the job to come back again", lambda: running(job_id, 2), log, timeout=90)
    wait_for("the job to finish", lambda: job(job_id)["JobState"] == "COMPLETED", log, timeout=120)

    out = log.read_text()
    assert out.count("preempted: stopped by SIGTERM at step") == 1, out[-3000:]
    assert out.count("preempted: stopped by SIGUSR1 at step") == 1, out[-3000:]
    assert "midtrain.sbatch: preempted by the time-limit warning" in out
    assert out.count("resumed stage ") == 2 and "(restart 2)" in out
    assert [r["loss"] for r in train_rows(run_dir)] == expected  # bit for bit
    assert not (run_dir / LOCK_FILE).exists()
