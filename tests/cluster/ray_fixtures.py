"""A real Ray cluster for tests: a local head started with `ray start --head`, stopped after.

Use it by importing the fixture into a test module (`from tests.cluster.ray_fixtures import ray_head`) and asking for
`ray_head`; tests skip with the reason when Ray is not installed (it comes with the `cluster` extra).

The head is kept small for a 2-core CI machine: 2 CPUs, no dashboard UI, a 200 MB object store, and a fixed 4 GiB
`memory` resource. The last one matters: datatrove's RayPipelineExecutor reserves 2 GB of Ray `memory` per task, and
Ray's own estimate (a share of free RAM) can be below that on a small machine, where tasks would then wait forever for
resources instead of running two at a time.

Teardown stops only this cluster: `ray start` runs in a new session, every daemon it launches (GCS, raylet, workers)
stays in that process group, and the group is signalled by its id. `ray stop --force` would kill every Ray process on
the machine, including a cluster the developer started themselves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the cluster's process group, then SIGKILL what is left (the GCS and raylet may ignore SIGTERM while
    workers shut down; `ray stop --force` escalates the same way)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _live_members(pgid):
            time.sleep(0.2)
        if not _live_members(pgid):
            return


def _live_members(pgid: int) -> list[int]:
    """Pids in the group that are not zombies (daemons reparented to a PID 1 that does not reap stay as zombies)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def ray_head():
    """Address ("127.0.0.1:PORT") of a fresh local Ray head; RAY_ADDRESS points at it while the tests run."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -c constraints.txt -e '.[dev,cluster]'")
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = free_port()
    # Short and unique: Ray puts unix sockets under it (path limit 107 bytes) and it names this cluster's files.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cmd = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--memory", str(4 << 30), "--object-store-memory", str(200 << 20),
           "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # `ray start --head` refuses to start when an address is already set
    start = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    pgid = start.pid  # the session leader's pid is the group id every daemon inherits
    try:
        out, _ = start.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _stop_group(pgid)
        pytest.fail("`ray start --head` did not return within 120 s")
    if start.returncode != 0:
        _stop_group(pgid)
        pytest.fail(f"`ray start --head` failed ({start.returncode}):\n{out[-3000:]}")
    address = f"127.0.0.1:{port}"
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address  # the driver (datatrove's executor) connects here on its first Ray call
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        _stop_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
