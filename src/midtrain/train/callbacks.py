"""Small trainer callbacks: metrics file, progress bar, periodic actions, optional TensorBoard / offline W&B."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from midtrain.train.trainer import Callback, Trainer


class MetricsWriter(Callback):
    """Appends rows to metrics.jsonl (main rank only); each line is flushed so a killed run loses nothing logged."""

    def __init__(self, path: Path, is_main: bool, every_steps: int = 1):
        self.path, self.is_main, self.every = path, is_main, every_steps

    def write(self, row: dict) -> None:
        if not self.is_main:
            return
        row = {**row, "time": time.time()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
            fh.flush()

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        last = trainer.state.stage_step == trainer.stage.steps
        if trainer.state.stage_step % self.every == 0 or last:
            self.write(row)


def truncate_metrics(path: Path, after_step: int) -> int:
    """Drops rows logged after `after_step` (they are superseded by the resumed run); atomic rewrite."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            dropped += 1
            continue
        if step > after_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class Every(Callback):
    """Calls `action(trainer)` each time the stage's tokens cross a multiple of `every_tokens`."""

    def __init__(self, every_tokens: int | None, action: Callable[[Trainer], None], at_end: bool = False):
        self.every, self.action, self.at_end = every_tokens, action, at_end

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        done = trainer.state.stage_step
        last = done == trainer.stage.steps
        if last and self.at_end:
            self.action(trainer)
            return
        if not self.every or last:
            return
        batch = trainer.stage.batch_tokens
        if (done * batch) // self.every > ((done - 1) * batch) // self.every:
            self.action(trainer)


class ProgressBar(Callback):
    """A rich progress bar per stage with loss, LR, tokens/s and ETA (main rank, interactive or not)."""

    def __init__(self, is_main: bool, console=None):
        self.is_main, self.console = is_main, console
        self.progress = None

    def on_stage_start(self, trainer: Trainer) -> None:
        if not self.is_main:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            trainer.stage.name, total=trainer.stage.steps, completed=trainer.state.stage_step,
            loss="-", lr="-", tps="-",
        )

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if self.progress is None:
            return
        loss = row["loss"]
        self.progress.update(
            self.task,
            completed=trainer.state.stage_step,
            loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss),
            lr=f"{row['lr']:.2e}",
            tps=f"{row['tokens_per_s']:,.0f}",
        )

    def on_stage_end(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard (optional extra `midtrain[tensorboard]`)."""

    def __init__(self, log_dir: Path, is_main: bool):
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step",):
                self.writer.add_scalar(f"{row['event']}/{key}", value, row["step"])

    def on_stage_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.flush()


class WandbLogger(Callback):
    """Offline Weights & Biases logging (never syncs by itself; `wandb sync` uploads later)."""

    def __init__(self, run_dir: Path, is_main: bool, name: str):
        self.run = None
        if is_main:
            import wandb

            self.run = wandb.init(mode="offline", dir=str(run_dir), name=name, reinit=True)

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
