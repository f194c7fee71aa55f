"""Named fault-injection points for crash-consistency tests (docs/RELIABILITY.md).

Off unless `MIDTRAIN_FAULT` is set; then each call to `point(name)` counts how often that point was reached in this
process and, on the chosen occurrence, acts:

    MIDTRAIN_FAULT=ckpt.mid_write:2          SIGKILL this process the 2nd time a checkpoint is half written
    MIDTRAIN_FAULT=ckpt.mid_write:1:enospc   raise OSError(ENOSPC) there instead (a full disk)
    MIDTRAIN_FAULT=train.mid_step:3-9:kill   the occurrence drawn from 3..9 by MIDTRAIN_FAULT_SEED (default 0)
    MIDTRAIN_FAULT=train.mid_step:5:nan      fill the step's gradients with NaN (a transient numeric fault)

Several specs may be joined by commas. Before acting, the point appends `<name> <occurrence> <action> <pid>` to the
file named by `MIDTRAIN_FAULT_MARKER` (fsynced), so a test can tell the process died *there*. A kill is
`SIGKILL` to ourselves: no `finally`, no atexit, no flush — what a preemption without warning or an OOM kill does.

When the variable is unset `point()` is one global lookup and a return (the spec is read once, at import).
"""

from __future__ import annotations

import errno
import os
import random
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ENV, MARKER_ENV, SEED_ENV = "MIDTRAIN_FAULT", "MIDTRAIN_FAULT_MARKER", "MIDTRAIN_FAULT_SEED"

# Where each point sits (the contract tests rely on; docs/RELIABILITY.md has the table).
POINTS = {
    "train.mid_step": "after backward, before the optimizer step (gradients exist, weights not yet updated)",
    "ckpt.mid_write": "model.safetensors and optimizer.pt of a checkpoint written, rng/trainer state and manifest not",
    "export.mid_write": "HF export written into its temp dir, not yet renamed into stages/<stage>/hf",
    "tokenize.mid_write": "a source's tokens.bin written, its offsets and meta.json not (cache dir still temporary)",
    "curate.mid_write": "curation reading documents into datatrove's filter job (outputs partly written)",
}
ACTIONS = ("kill", "exit", "enospc", "nan")
EXIT_CODE = 86  # `exit` action: os._exit with this code (a crash that still reports a status)


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    point: str
    occurrence: int  # act on this (1-based) arrival at the point
    action: str = "kill"
    seen: int = 0


def parse(spec: str, seed: int = 0) -> dict[str, Fault]:
    """`point:N[:action]` or `point:LO-HI[:action]` (occurrence drawn from LO..HI with `seed`), comma-separated."""
    faults: dict[str, Fault] = {}
    rng = random.Random(seed)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise FaultSpecError(f"{ENV}={spec!r}: expected POINT:N[:ACTION], got {item!r}")
        name, count, action = parts[0], parts[1], parts[2] if len(parts) == 3 else "kill"
        if name not in POINTS:
            raise FaultSpecError(f"{ENV}: unknown point {name!r} (points: {', '.join(sorted(POINTS))})")
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}: unknown action {action!r} (actions: {', '.join(ACTIONS)})")
        lo, _, hi = count.partition("-")
        try:
            lo_n, hi_n = int(lo), int(hi or lo)
        except ValueError:
            raise FaultSpecError(f"{ENV}: occurrence must be N or LO-HI, got {count!r}") from None
        if not 1 <= lo_n <= hi_n:
            raise FaultSpecError(f"{ENV}: occurrence must be >= 1 (and LO <= HI), got {count!r}")
        faults[name] = Fault(name, rng.randint(lo_n, hi_n), action)
    return faults


def configure(spec: str | None, seed: int = 0) -> None:
    """(Re)arms the points from a spec (None or "" disarms); what the environment does at import."""
    global _ARMED
    _ARMED = (parse(spec, seed) or None) if spec else None


def armed() -> dict[str, Fault] | None:
    return _ARMED


def point(name: str, poison: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
    """Marks a fault-injection point; a no-op unless `MIDTRAIN_FAULT` arms `name`.

    `poison` returns the tensors (e.g. parameters, whose `.grad` is filled) the `nan` action corrupts.
    """
    if _ARMED is None:
        return
    fault = _ARMED.get(name)
    if fault is None:
        return
    fault.seen += 1
    if fault.seen != fault.occurrence:
        return
    _mark(f"{name} {fault.seen} {fault.action} {os.getpid()}\n")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(EXIT_CODE)  # not reached; SIGKILL cannot be caught
    if fault.action == "exit":
        os._exit(EXIT_CODE)
    if fault.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")
    if fault.action == "nan":
        if poison is None:
            raise FaultSpecError(f"{ENV}: point {name!r} has nothing to poison with 'nan'")
        for t in poison():
            if t.grad is not None:
                t.grad.detach().fill_(float("nan"))


def _mark(line: str) -> None:
    path = os.environ.get(MARKER_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(path: str | os.PathLike) -> list[tuple[str, int, str, int]]:
    """The (point, occurrence, action, pid) lines a marker file holds (empty if none was reached)."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        name, n, action, pid = line.split()
        out.append((name, int(n), action, int(pid)))
    return out


_ARMED: dict[str, Fault] | None = None
configure(os.environ.get(ENV), int(os.environ.get(SEED_ENV, "0") or 0))
