"""The datatrove executor a data job runs on (`local`, `slurm` or `ray`), with midtrain's defaults; shared by
curation (`curate.py`) and sharded tokenization (`sharded_tokenize.py`)."""

from __future__ import annotations

from pathlib import Path


def pipeline_executor(executor: str, pipeline: list, *, tasks: int, logs: Path, job_name: str, workers: int = 1,
                      slurm: dict | None = None, depends=None, start_method: str | None = None):
    """datatrove's executor for `pipeline` on `executor` (local, slurm or ray), with midtrain's defaults: a failed
    Slurm or Ray task raises (instead of hanging), a Slurm job asks for 1 CPU, 2 GB per CPU and 12 h unless `slurm`
    says otherwise, and runs on the cluster's default partition and qos (datatrove's "normal" qos does not exist on
    every cluster). `start_method` picks how local workers start (datatrove's default when None)."""
    if executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        extra = {"start_method": start_method} if start_method else {}
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=str(logs), depends=depends, **extra)
    if executor == "slurm":
        from midtrain.data.curate_slurm import CheckedSlurmPipelineExecutor

        opts = {"time": "12:00:00", "partition": None, "qos": None, "cpus_per_task": 1, "mem_per_cpu_gb": 2,
                **(slurm or {})}
        return CheckedSlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logs),
                                            job_name=job_name, depends=depends, **opts)
    if executor == "ray":
        from midtrain.data.curate_ray import CheckedRayPipelineExecutor

        return CheckedRayPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(logs), depends=depends)
    raise ValueError(f"executor {executor!r}: expected local, slurm or ray")
