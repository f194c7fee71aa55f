"""Preemption: SIGTERM / SIGUSR1 (Slurm's warning) / SIGINT ask the run to checkpoint and exit with code 75.

The handler only records the signal; the trainer acts on it at the next step boundary, where the state is
consistent. Ranks may receive the signal at different times, so every rank takes the max of the flag each step
(one scalar all-reduce) and they all stop at the same step. A second SIGINT falls back to an immediate interrupt.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

from midtrain.train.trainer import Callback, Trainer

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the run resumes where it stopped
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI turns it into exit code 75."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint saved; run the same command to resume")
        self.signal_name, self.step = signal_name, step


class PreemptionGuard:
    """Context manager installing the handlers (main thread only; elsewhere it is inert)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user means it
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.received is None:
                self.received = signal.SIGTERM  # another rank's signal: name it as the generic one
        return bool(flag.item())


class StopOnSignal(Callback):
    """At a step boundary after a signal: save a checkpoint (unless this step was just saved) and stop the stage."""

    def __init__(self, guard: PreemptionGuard, save: Callable[[Trainer], None], saved_step: Callable[[], int]):
        self.guard, self.save, self.saved_step = guard, save, saved_step

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if not self.guard.agreed(trainer.dist.device):
            return
        if self.saved_step() != trainer.state.global_step:
            self.save(trainer)
        trainer.should_stop = True
