"""One writer per run dir: a lock file with the owner's pid and host, created atomically (O_EXCL).

A lock left by a process that no longer exists on this host is stale and taken over with a note; so is one left by
an earlier incarnation of this same Slurm job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT: Slurm requeues a job
only once all its processes are gone, possibly onto other nodes, so after a SIGKILL the lock names a host we cannot
look into). A lock held by a live process, or by another host and another job, is a clear error saying how to
proceed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from midtrain.layout import RunLayout


class RunLockError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _slurm_job() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job": job, "slurm_restart": int(restarts) if restarts.isdigit() else 0}


def _earlier_incarnation(owner: dict, me: dict) -> bool:
    """The owner is this Slurm job before a requeue (the job's processes are all gone by then)."""
    return bool(me.get("slurm_job")) and owner.get("slurm_job") == me["slurm_job"] \
        and isinstance(owner.get("slurm_restart"), int) and owner["slurm_restart"] < me["slurm_restart"]


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock
        self.took_over: dict | None = None  # the stale owner replaced, for the caller to report

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **_slurm_job()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))) \
                        or _earlier_incarnation(owner, me):
                    self.took_over = owner or {}
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockError(
                    f"{self.path.parent} is in use by pid {owner.get('pid')} on {owner.get('host')} (started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}); two runs must "
                    f"not write one run dir. If that process is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise RunLockError(f"could not take the lock {self.path} (another process keeps recreating it)")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written by a process killed while creating it: stale
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            return None  # not a lock midtrain wrote: as stale as an unreadable one
        return owner

    def __exit__(self, *exc: object) -> None:
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
