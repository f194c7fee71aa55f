"""`midtrain run --profile-steps A:B`: a torch profiler trace of global steps A..B, per rank.

Writes RUN/profile/rank<r>-steps<A>-<B>.json (Chrome trace: chrome://tracing or https://ui.perfetto.dev; one per
stage the range covers) and a .txt beside it with the ops that took the most self time (CPU, and CUDA where
present), grouped by input shape: where a step goes, without editing code. Profiling slows the profiled steps; the
rest of the run is untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from midtrain.io import fsync_dir, temp_path, write_text_atomic
from midtrain.train.trainer import Callback, Trainer


def parse_step_range(text: str) -> tuple[int, int]:
    """"A:B" (global steps A to B, inclusive) or "A" (that step alone); steps count from 1."""
    first, colon, last = text.partition(":")
    try:
        a, b = int(first), int(last if colon else first)
    except ValueError:
        raise ValueError(f"profile steps must be A:B or A with whole numbers (got {text!r})") from None
    if not 1 <= a <= b:
        raise ValueError(f"profile steps must satisfy 1 <= A <= B (got {text!r})")
    return a, b


class StepProfiler(Callback):
    """Profiles global steps `first`..`last` of one stage: starts after step first-1 ends (or when the stage starts
    there) and writes the trace when step `last` ends, or at the stage's end. `midtrain run` makes one per stage, so
    a range across stages gives one trace per stage."""

    def __init__(self, first: int, last: int, out_dir: Path, rank: int, top_ops: int = 40):
        self.first, self.last, self.out_dir, self.rank, self.top_ops = first, last, out_dir, rank, top_ops
        self.profiler: torch.profiler.profile | None = None
        self.started_at = 0
        self.written: list[Path] = []

    def _maybe_start(self, trainer: Trainer) -> None:
        next_step = trainer.state.global_step + 1
        if self.profiler is None and not self.written and self.first <= next_step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
            self.started_at = next_step

    def on_stage_start(self, trainer: Trainer) -> None:
        self._maybe_start(trainer)

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if self.profiler is not None and trainer.state.global_step >= self.last:
            self._finish(trainer.state.global_step)
        else:
            self._maybe_start(trainer)

    def on_stage_end(self, trainer: Trainer) -> None:
        if self.profiler is not None:
            self._finish(trainer.state.global_step)

    def _finish(self, last_step: int) -> None:
        prof, self.profiler = self.profiler, None
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}-steps{self.started_at}-{last_step}"
        trace = stem.with_suffix(".json")
        tmp = temp_path(trace)
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        fsync_dir(self.out_dir)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=self.top_ops,
                                                                   max_name_column_width=60,
                                                                   max_shapes_column_width=80)
        write_text_atomic(stem.with_suffix(".txt"), f"global steps {self.started_at}-{last_step}, rank {self.rank}, "
                                                    f"sorted by {sort}\n\n{table}\n")
        self.written += [trace, stem.with_suffix(".txt")]
