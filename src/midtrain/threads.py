"""How many CPU threads torch should use: what the user asked for, else what the machine and its load leave free.

Oversubscription is the usual slowdown on shared machines: torch starts one thread per core in every process, so a
2-core machine with another busy process (or two torchrun ranks) runs 2-4 threads per free core and each step
stalls (measured: a run took 2:43 instead of 1:05 with one thread; `python -m benchmarks --only threads`).
`auto` gives each local rank its share of the cores that the 1-minute load average leaves idle, at least 1.
An explicit OMP_NUM_THREADS in the environment counts as the user's choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def choose_threads(requested: int | str | None = "auto", *, cores: int | None = None, load: float | None = None,
                   local_ranks: int | None = None, env: dict[str, str] | None = None) -> ThreadChoice:
    """`requested`: a positive int (used as is), or `auto`/None (decided from cores, load and local ranks)."""
    env = os.environ if env is None else env
    if isinstance(requested, int) and not isinstance(requested, bool):
        if requested < 1:
            raise ValueError(f"threads: {requested}: must be a positive number of threads, or auto")
        return ThreadChoice(requested, "as asked")
    if requested not in (None, "auto"):
        raise ValueError(f"threads: {requested!r}: expected a positive number of threads, or auto")
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS")
    cores = cores or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None and hasattr(os, "getloadavg") else (load or 0.0)
    ranks = local_ranks or int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    idle = max(1.0, cores - load)
    share = max(1, min(cores // ranks or 1, int(idle / ranks + 0.5)))
    return ThreadChoice(share, f"auto: {cores} cores, load {load:.1f}, {ranks} local rank(s)")


def apply_threads(requested: int | str | None = "auto") -> ThreadChoice:
    """Chooses and sets torch's intra-op threads; returns the choice (for a line saying so)."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice
