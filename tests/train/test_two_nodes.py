"""Two-node torchrun rehearsal on one machine: the check a user runs before going to many nodes.

Two torchrun agents, started as separate processes the way two nodes would start them (`--nnodes 2
--nproc-per-node 1 --node-rank 0|1`, c10d rendezvous on 127.0.0.1), train the recipe of tests/train/test_distributed.py
with FSDP2 on gloo. Unlike `--standalone --nproc-per-node 2`, each rank is LOCAL_RANK 0 of its own "node" with
LOCAL_WORLD_SIZE 1, and the world is formed by rendezvous between agents; code that confuses local and global rank
(two "node leaders" writing one run directory, a shard chosen by local rank) fails here. Per-step losses, grad norms,
LRs, held-out losses and exported weights must match the one-process run within test_distributed's tolerances.

Both agents share this machine, so each runs its rank with one thread (OMP_NUM_THREADS=1), as a user rehearsing
on a laptop would: the thread count changes fp32 rounding only, far inside the tolerances.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.train.test_distributed import (
    STAGES,
    TOTAL_STEPS,
    Workspace,
    _assert_rows_close,
    _assert_weights_close,
    _rank_logs,
    _rows,
)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(ws: Workspace, run_dir: Path, node_rank: int, endpoint: str, rdzv_id: str) -> subprocess.Popen:
    """One node's torchrun agent; node 0 hosts the rendezvous store (is_host), as the first node of a job would."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
           "--rdzv-id", rdzv_id, "--rdzv-conf", f"is_host={int(node_rank == 0)},join_timeout=120",
           "--local-addr", "127.0.0.1", "--max-restarts", "0",
           f"--log-dir={ws.log_dir(run_dir) / f'node{node_rank}'}", "--tee=3",
           "-m", "midtrain", "run", str(ws.recipe), "--set", f"run_dir={run_dir}", "--set", "distributed=fsdp2"]
    env = {**ws.env(), "OMP_NUM_THREADS": "1"}
    out = open(ws.log_dir(run_dir).with_name(f"{run_dir.name}-node{node_rank}.out"), "w")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ws.root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_torchrun_nodes_match_one_process(tmp_path):
    ws = Workspace(tmp_path)
    run_dir = tmp_path / "two-nodes"
    ws.log_dir(run_dir).mkdir(parents=True)
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", f"midtrain-{uuid.uuid4().hex[:8]}"
    # Node 1 starts first on purpose: a real node may come up before the rendezvous host and must wait for it.
    agents = [_agent(ws, run_dir, 1, endpoint, rdzv_id), _agent(ws, run_dir, 0, endpoint, rdzv_id)]
    try:
        for p in agents:
            p.wait(timeout=300)
    finally:
        _stop(agents)
    outputs = {n: run_dir.with_name(f"{run_dir.name}-node{n}.out").read_text() for n in (0, 1)}
    for n, p in zip((1, 0), agents):
        assert p.returncode == 0, f"node {n} agent exit {p.returncode}:\n{outputs[n][-4000:]}"
    # Each agent started exactly one worker, and the two workers were global ranks 0 and 1 of one world.
    for n in (0, 1):
        logs = _rank_logs(ws.log_dir(run_dir) / f"node{n}", "stdout.log")
        assert len(logs) == 1, f"node {n}: {logs}"
    assert "WORLD_SIZE" not in os.environ  # the reference below is a plain single process

    single = tmp_path / "single"
    proc = ws.run(single, "none")
    assert proc.returncode == 0, proc.stderr[-4000:]

    ref = _rows(single, "train")
    assert [r["step"] for r in ref] == list(range(1, TOTAL_STEPS + 1))
    _assert_rows_close(ref, _rows(run_dir, "train"), "two-node fsdp2 train")
    _assert_rows_close(_rows(single, "val"), _rows(run_dir, "val"), "two-node fsdp2 val")
    for stage in STAGES:
        _assert_weights_close(single / "stages" / stage / "hf" / "model.safetensors",
                              run_dir / "stages" / stage / "hf" / "model.safetensors")
