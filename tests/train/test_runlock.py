"""One writer per run dir: live owners refused, stale locks (dead pid on this host) taken over, released on exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from midtrain.layout import LOCK_FILE as LOCK_NAME
from midtrain.train.runlock import RunLock, RunLockError


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with RunLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()}.*delete .*{LOCK_NAME}"):
            with RunLock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    with RunLock(tmp_path) as lock:
        assert lock.took_over["pid"] == pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_half_written_lock_is_stale_but_another_hosts_lock_is_not(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # killed while creating it
    with RunLock(tmp_path) as lock:
        assert lock.took_over == {}
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunLockError, match="on elsewhere"):
        with RunLock(tmp_path):
            pass


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock_from_another_host(tmp_path, monkeypatch):
    """After a SIGKILL the lock names the node the job ran on before the requeue; Slurm requeues only once every
    process of the job is gone, so the same job id with a higher restart count may take it. Another job may not."""
    earlier = {"pid": 4242, "host": "node-17", "started": 0, "slurm_job": "991", "slurm_restart": 0}
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
    with RunLock(tmp_path) as lock:
        assert lock.took_over == earlier
        mine = json.loads((tmp_path / LOCK_NAME).read_text())
        assert mine["slurm_job"] == "991" and mine["slurm_restart"] == 1
    for other in ({**earlier, "slurm_restart": 1}, {**earlier, "slurm_job": "992"}, {**earlier, "slurm_job": None}):
        (tmp_path / LOCK_NAME).write_text(json.dumps(other))  # the same incarnation, another job, or no job
        with pytest.raises(RunLockError, match="in use by pid 4242 on node-17"):
            with RunLock(tmp_path):
                pass
