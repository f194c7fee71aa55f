"""Suite-wide hooks: the test run leaves no helper processes behind (issue 24: a resource tracker and two fork servers,
~700 MB, outlived pytest)."""

from __future__ import annotations

import os
import signal
import time


def _stop(pid: int | None, fds: list[int | None], grace_s: float = 5.0) -> None:
    """Closes the helper's pipe (it exits on EOF), waits a little, then kills it: a grandchild that inherited the pipe
    keeps it open, and an unbounded wait would hang the suite's exit."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    if not pid:
        return
    deadline = time.monotonic() + grace_s
    try:
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def pytest_sessionfinish(session, exitstatus) -> None:
    # The reliability harness's fork server and multiprocessing's resource tracker live until asked to stop. Python has
    # no public call for it; these are the stdlib's own singletons (3.10-3.13 attribute names).
    import multiprocessing.forkserver as forkserver
    import multiprocessing.resource_tracker as resource_tracker

    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    _stop(getattr(server, "_forkserver_pid", None), [getattr(server, "_forkserver_alive_fd", None)])
    for name in ("_forkserver_pid", "_forkserver_alive_fd", "_forkserver_address"):
        if hasattr(server, name):
            setattr(server, name, None)
    _stop(getattr(tracker, "_pid", None), [getattr(tracker, "_fd", None)])
    for name in ("_pid", "_fd"):
        if hasattr(tracker, name):
            setattr(tracker, name, None)
