"""Curation's datatrove jobs on a Ray cluster: a failed task stops the chain with its log, instead of a silent hang.

Why: datatrove 0.10's RayPipelineExecutor reports an error raised inside a task only as a log line ("Only 1/2 tasks
completed") and returns normally; the next job of the chain then waits for its dependency's completion markers,
polling every two minutes, forever. `CheckedRayPipelineExecutor` checks its job's completion markers
(`logs/<job>/completions/<rank>`) after running and raises an error that names the failed tasks, their logs
(`logs/<job>/logs/task_<rank>.log`, copied there by datatrove even when the task fails) and the error each log ends
with (for a bad input file, our DataError naming the file). Every job runs its dependency first, so the first failed
job of a chain is the one reported and no later job starts.

Completed tasks keep their markers, so a re-submission after a fix runs only what did not complete; `_SUCCESS` is
written by the chain's last job, which never runs after a failure, so nothing reads a partial output.

The cluster is found the way Ray always finds it: `RAY_ADDRESS`, else a cluster started on this machine with
`ray start --head`, else Ray starts a local one for this process.
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.executor import RayPipelineExecutor

from midtrain.data.errors import DataError


class CurationTaskError(DataError):
    """A curation task failed on the cluster; the message names its job, its log and the error it logged."""


class CheckedRayPipelineExecutor(RayPipelineExecutor):
    """datatrove's Ray executor, raising CurationTaskError when a task of this job did not complete."""

    def run(self):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError("curation.executor: ray needs Ray installed: pip install 'midtrain[cluster]'") from None
        super().run()  # returns at once when every task has its completion marker (a re-submission)
        failed = self.get_incomplete_ranks()
        if failed:
            raise CurationTaskError(describe_failure(Path(self.logging_dir.path), failed, self.world_size))


def describe_failure(logging_dir: Path, failed: list[int], world_size: int) -> str:
    """"curation job 'filter' failed in 1 of 2 tasks: task 0: <error> (log: <path>); ..." for the failed ranks."""
    parts = []
    for rank in failed[:4]:  # a bad input usually fails every task the same way: a few logs are enough
        log = logging_dir / "logs" / f"task_{rank:05d}.log"
        parts.append(f"task {rank}: {last_error(log) or 'no error in its log'} (log: {log})")
    more = f"; and {len(failed) - 4} more tasks" if len(failed) > 4 else ""
    return (f"curation job {logging_dir.name!r} failed in {len(failed)} of {world_size} tasks: "
            + "; ".join(parts) + more + ". Fix the cause and run again: completed tasks are skipped.")


# The last line of a Python traceback: "package.module.SomeError: message" (loguru's logger.exception writes one).
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)\w*): (.+)$")


def last_error(log: Path) -> str | None:
    """The exception a task's log ends with, as "DataError: <message>" (None when the log is missing or has none)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        m = _EXCEPTION_LINE.match(line.strip())
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return None
