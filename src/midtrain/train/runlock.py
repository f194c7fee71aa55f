"""One writer per run dir: a lock file with the owner's pid and host, created atomically (O_EXCL).

A lock left by a process that no longer exists on this host is stale and taken over with a note; a lock held by a
live process, or by another host (whose processes we cannot see), is a clear error saying how to proceed.
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


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock
        self.took_over: dict | None = None  # the stale owner replaced, for the caller to report

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))):
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
