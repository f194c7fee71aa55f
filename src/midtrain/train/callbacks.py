"""Small trainer callbacks: metrics file, progress bar, periodic actions, optional TensorBoard / offline W&B."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path

from midtrain.io import write_text_atomic
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


def truncate_metrics(path: Path, after_step: int, *, keep_stages: Collection[str] = ()) -> int:
    """Drops rows logged after `after_step` (they are superseded by the resumed run); atomic rewrite. Rows of
    `keep_stages` (the stages after the one resuming, e.g. when an earlier stage is re-exported) are history that
    belongs to them and stay."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = float(row.get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):  # a line cut by a kill mid-write
            dropped += 1
            continue
        if step > after_step and row.get("stage") not in keep_stages:
            dropped += 1
        else:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def has_row(path: Path, event: str, stage: str) -> bool:
    """Whether metrics.jsonl at `path` holds a row of `event` for `stage`."""
    if not path.is_file():
        return False
    needle = f'"event": "{event}"'
    for line in path.read_text().splitlines():
        if needle in line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("event") == event and row.get("stage") == stage:
                return True
    return False


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
    """A rich progress bar per stage with loss, LR, tokens/s, MFU (when logged) and ETA (main rank).

    When output is not a terminal (CI, `| tee`), a live bar would print nothing until the end: print a plain line
    every ~10% of the stage (and at least every `log_seconds`) instead.
    """

    def __init__(self, is_main: bool, console=None, log_seconds: float = 30.0):
        self.is_main, self.console, self.log_seconds = is_main, console, log_seconds
        self.progress = None
        self.plain = False

    def on_stage_start(self, trainer: Trainer) -> None:
        if not self.is_main:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = self.console or Console()
        self.start_time, self.start_step, self.last_print = time.time(), trainer.state.stage_step, 0.0
        self.plain = not self.console.is_terminal
        if self.plain:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            trainer.stage.name, total=trainer.stage.steps, completed=trainer.state.stage_step,
            loss="-", lr="-", speed="- tok/s",
        )

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if not self.is_main:
            return
        loss = f"{row['loss']:.4f}" if math.isfinite(row["loss"]) else str(row["loss"])
        speed = f"{row['tokens_per_s']:,.0f} tok/s" + (f"  mfu {row['mfu']:.0%}" if "mfu" in row else "")
        if self.progress is not None:
            self.progress.update(self.task, completed=trainer.state.stage_step, loss=loss,
                                 lr=f"{row['lr']:.2e}", speed=speed)
            return
        if not self.plain:
            return
        done, total = trainer.state.stage_step, trainer.stage.steps
        now = time.time()
        tenth = max(1, total // 10)
        if done % tenth and done != total and now - self.last_print < self.log_seconds:
            return
        self.last_print = now
        rate = (now - self.start_time) / max(1, done - self.start_step)
        eta = rate * (total - done)
        self.console.print(
            f"{trainer.stage.name} {done}/{total}  loss {loss}  lr {row['lr']:.2e}  {speed}  eta {eta:,.0f}s",
            highlight=False,
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


class ThroughputMonitor(Callback):
    """Adds `model_tflops_per_s` and `mfu` to each train row (before the metrics writer logs it).

    `flops_per_token` comes from `midtrain.train.flops.training_flops_per_token` (the model is the caller's concern,
    not the trainer's). The peak is a matmul in the step's compute precision, measured on this rank's device at the
    first stage start of the process (`matmul_peak_cached`: on a shared machine it moves, and so does MFU). Emulated
    bf16 (a CPU without native bf16) has no meaningful peak: rows then carry the FLOP/s but no MFU.
    """

    def __init__(self, flops_per_token: int, measure_seconds: float = 0.5):
        self.flops_per_token, self.measure_seconds = flops_per_token, measure_seconds
        self.peak_flops: float | None = None

    def on_stage_start(self, trainer: Trainer) -> None:
        import torch

        from midtrain.train.flops import matmul_peak_cached
        from midtrain.train.precision import native_bf16

        device = trainer.dist.device
        bf16 = trainer.precision == "bf16-mixed"
        if bf16 and not native_bf16(device):
            self.peak_flops = None
            return
        size = 4096 if device.type == "cuda" else 1024
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.peak_flops = matmul_peak_cached(dtype, size, self.measure_seconds, device)

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        achieved = self.flops_per_token * row["tokens_per_s"]  # tokens of all ranks
        row["model_tflops_per_s"] = achieved / 1e12
        if self.peak_flops:
            row["mfu"] = achieved / (self.peak_flops * trainer.dist.world_size)
