"""Curation's datatrove jobs on Slurm: submit the chain, wait for it, and report a failed task with its log.

datatrove's SlurmPipelineExecutor submits each job of the chain as an sbatch job array that depends (`afterok`) on
the previous job, and returns at once. When a task fails, every later job waits forever on a dependency that can
never be satisfied, and nothing says so. `wait_for_chain` polls `squeue` until the chain's jobs have left the queue
or one of them left it with tasks lacking their completion markers (`logs/<job>/completions/<rank>`); then it
cancels what is still queued and raises an error naming the failed tasks, their logs and the error each log ends
with (for a bad input file, our DataError naming the file). `_SUCCESS` is written by the chain's last job, which
never runs after a failure, so nothing reads a partial output; completed tasks keep their markers, so a
re-submission after a fix runs only what did not complete.

`CheckedSlurmPipelineExecutor` adds two things to datatrove's class: it remembers the id of the stats-merging job it
submits beside each job (so that waiting and cancelling cover it), and it leaves out an empty `partition` or `qos`
(datatrove always writes both; the cluster's defaults then apply).
"""

from __future__ import annotations

import getpass
import subprocess
import time
from pathlib import Path

from datatrove.executor import SlurmPipelineExecutor

from midtrain.data.curate_ray import CurationTaskError, describe_failure
from midtrain.data.errors import DataError


class CheckedSlurmPipelineExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, keeping the ids of every job it submits and dropping empty sbatch options."""

    merge_job_id: str | None = None

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        for key in ("partition", "qos"):
            if key in args and args[key] in (None, "", "None"):
                del args[key]
        return args

    def launch_merge_stats(self):
        from datatrove.executor.slurm import launch_slurm_job

        # As datatrove's own, but keeping the job id (datatrove drops it).
        self.merge_job_id = launch_slurm_job(
            self.get_launch_file_contents(
                {**self.get_sbatch_args(), "cpus-per-task": 1, "mem-per-cpu": "1G",
                 "dependency": f"afterok:{self.job_id}"},
                f"merge_stats {self.logging_dir.resolve_paths('stats')} "
                f"-o {self.logging_dir.resolve_paths('stats.json')}",
            ),
            self.job_id_retriever,
        )

    @property
    def submitted(self) -> list[str]:
        """Ids of this job's sbatch jobs (none when every task was complete already)."""
        if self.job_id in (None, -1):
            return []
        return [str(self.job_id)] + ([str(self.merge_job_id)] if self.merge_job_id else [])


def queued(ids: set[str]) -> set[str]:
    """Which of these (array) job ids are still pending, running or completing."""
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F"], capture_output=True, text=True)
    if out.returncode != 0:
        raise DataError(f"squeue failed while waiting for the curation jobs {sorted(ids)}: {out.stderr.strip()}")
    return ids & {line.strip() for line in out.stdout.splitlines()}


def wait_for_chain(jobs: list[CheckedSlurmPipelineExecutor], success: Path, *, poll_s: float = 2.0,
                   timeout_s: float | None = None) -> None:
    """Block until the chain submitted by `jobs[-1].run()` has finished and written `success`; raise
    CurationTaskError naming the first failed job's tasks and logs otherwise (the rest of the chain is cancelled)."""
    ids = {i for job in jobs for i in job.submitted}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        waiting = queued(ids)
        # In chain order: the first job that has left the queue with incomplete tasks failed (its tasks write their
        # completion markers before they exit, so a job out of the queue without them will never get them).
        for job in jobs:
            if str(job.job_id) in waiting or job.job_id in (None, -1):
                continue
            failed = job.get_incomplete_ranks()
            if failed:
                cancel(waiting)
                slurm_logs = Path(job.slurm_logs_folder)
                raise CurationTaskError(describe_failure(Path(job.logging_dir.path), failed, job.world_size)
                                        + f" Slurm's own output of the job (id {job.job_id}): {slurm_logs}/")
        if not waiting:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise DataError(f"the curation jobs {sorted(waiting)} are still queued after {timeout_s:.0f} s; "
                            "they keep running (see `squeue`)")
        time.sleep(poll_s)
    if not success.is_file():
        raise DataError(f"the curation jobs finished but {success} is missing; see the task logs under "
                        f"{Path(jobs[-1].logging_dir.path).parent}")


def cancel(ids: set[str]) -> None:
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, text=True)
