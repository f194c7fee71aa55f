"""A real single-node Slurm for the tests marked `slurm`, started by scripts/slurm_local.sh.

The `slurm_cluster` fixture (session scope) starts the cluster when Slurm's binaries are installed, else skips with
the command that installs them. A cluster already running in the same directory (CI or a developer started it with
`scripts/slurm_local.sh start`) is used and left running; one the fixture started is stopped at the end of the session.
While the tests run, SLURM_CONF points at it, so `sbatch`, `squeue` and datatrove's Slurm executor find it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
INSTALL = "apt-get install -y slurm-wlm munge"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a local Slurm cluster (scripts/slurm_local.sh; skipped without "
                                       f"Slurm installed: {INSTALL})")


def _installed(name: str) -> bool:
    return shutil.which(name) is not None or Path("/usr/sbin", name).is_file()


def _script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster (partition `debug`, the node's real CPUs)."""
    missing = [name for name in DAEMONS if not _installed(name)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): {INSTALL}")
    already = _script("status").returncode == 0
    started = _script("start")
    if started.returncode != 0:
        pytest.fail(f"{SCRIPT} start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    conf = next(line.split("=", 1)[1] for line in started.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not already:
            stopped = _script("stop")
            assert stopped.returncode == 0, f"{SCRIPT} stop failed:\n{stopped.stdout}\n{stopped.stderr}"
