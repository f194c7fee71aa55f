"""Learning-rate schedules as pure functions of tokens seen (CONTRACTS.md §1.1, REFERENCE.md §3).

No scheduler state is stored: the LR of any step is ``lr(k * batch_tokens)``, so resuming, changing the
batch size or replaying a step can never drift or be off by one.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from midtrain.io import write_bytes_atomic

Kind = Literal["constant", "cosine", "linear", "wsd"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]

KINDS: tuple[str, ...] = ("constant", "cosine", "linear", "wsd")
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt", "exponential")
DECAYING_KINDS: tuple[str, ...] = ("cosine", "linear", "wsd")


def horizon_tokens_for(n_steps: int, batch_tokens: int) -> int:
    """T = tokens seen before a stage's last step, so that step runs exactly at ``min_lr``."""
    if n_steps < 1 or batch_tokens < 1:
        raise ValueError(f"n_steps and batch_tokens: expected >= 1 (got {n_steps}, {batch_tokens})")
    return (n_steps - 1) * batch_tokens


def decay_weight(shape: str, p: float, half_life: float = 0.1) -> float:
    """w(p) for decay progress p in [0, 1]: 1 at p = 0, exactly 0 at p = 1, non-increasing."""
    p = min(1.0, max(0.0, p))
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    if shape == "exponential":
        # MiniCPM's 0.5**(p/h) never reaches 0; we subtract its value at p = 1 and rescale so that
        # w(0) = 1 and w(1) = 0 exactly: the last step lands exactly on min_lr.
        floor = 0.5 ** (1.0 / half_life)
        return (0.5 ** (p / half_life) - floor) / (1.0 - floor)
    raise ValueError(f"decay_shape: expected one of {', '.join(DECAY_SHAPES)} (got {shape!r})")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number (got {value!r})")
    return float(value)


def _check_tokens(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an integer number of tokens >= 0 (got {value!r})")
    return value


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up from ``start_lr`` to ``peak_lr``, then constant / cosine / linear / WSD until ``horizon_tokens``."""

    kind: Kind
    peak_lr: float
    horizon_tokens: int  # T = (n_steps - 1) * batch_tokens; 0 for a 1-step stage
    start_lr: float = 0.0  # LR at t = 0 (non-zero for a re-warm that continues a model)
    min_lr: float = 0.0  # explicit final LR of decaying kinds: nothing defaults to "no decay"
    warmup_tokens: int = 0
    decay_fraction: float = 0.2  # wsd: last fraction of T spent decaying
    decay_shape: DecayShape = "linear"  # wsd only
    half_life: float = 0.1  # exponential: half-life as a fraction of the decay

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape: expected one of {', '.join(DECAY_SHAPES)} (got {self.decay_shape!r})")
        for name in ("peak_lr", "start_lr", "min_lr"):
            if _check_real(name, getattr(self, name)) < 0:
                raise ValueError(f"{name}: expected >= 0 (got {getattr(self, name)!r})")
        T = _check_tokens("horizon_tokens", self.horizon_tokens)
        W = _check_tokens("warmup_tokens", self.warmup_tokens)
        # Validated for every kind (the defaults are valid) so a typo is caught even where unused.
        if not 0.0 < _check_real("decay_fraction", self.decay_fraction) <= 1.0:
            raise ValueError(f"decay_fraction: expected a value in (0, 1] (got {self.decay_fraction!r})")
        if not 0.0 < _check_real("half_life", self.half_life) <= 1.0:
            raise ValueError(f"half_life: expected a value in (0, 1] (got {self.half_life!r})")
        if self.decaying:
            if self.min_lr > self.peak_lr:
                raise ValueError(
                    f"min_lr: expected <= peak_lr ({self.peak_lr!r}) for kind {self.kind!r} (got {self.min_lr!r})"
                )
            if W > T:
                raise ValueError(
                    f"warmup_tokens: expected <= horizon_tokens ({T}) for kind {self.kind!r} (got {W})"
                )

    @property
    def decaying(self) -> bool:
        return self.kind in DECAYING_KINDS

    @property
    def final_lr(self) -> float:
        """LR at t >= T (the stage's last step)."""
        return self.min_lr if self.decaying else self.peak_lr

    @property
    def decay_start_tokens(self) -> float:
        """Where the decay begins: end of warm-up (cosine/linear), T(1-f) but not before warm-up ends (wsd)."""
        if self.kind == "wsd":
            return max(float(self.warmup_tokens), self.horizon_tokens * (1.0 - self.decay_fraction))
        if self.kind == "constant":
            return float(self.horizon_tokens)  # never decays
        return float(self.warmup_tokens)

    def lr(self, tokens: float) -> float:
        """LR for a step taken after ``tokens`` tokens of this stage (a pure function)."""
        if not tokens >= 0:  # also rejects NaN
            raise ValueError(f"tokens: expected >= 0 (got {tokens!r})")
        t, W, T = float(tokens), self.warmup_tokens, self.horizon_tokens
        if t < W:  # warm-up wins over everything else, so t = 0 is always start_lr when W > 0
            return self.start_lr + (self.peak_lr - self.start_lr) * (t / W)
        if self.kind == "constant":
            # Constant ignores T: a warm-up longer than the stage simply never reaches peak.
            return self.peak_lr
        if t >= T:  # includes T == 0 and T == W: the last step is exactly min_lr
            return self.min_lr
        start = self.decay_start_tokens
        if t < start:  # wsd stable phase
            return self.peak_lr
        p = (t - start) / (T - start)  # T > t >= start, so no division by zero
        shape = self.decay_shape if self.kind == "wsd" else self.kind
        w = decay_weight(shape, p, self.half_life)
        # min + (peak-min)*w is monotone in w; the clamp removes 1-ulp overshoot of peak at p = 0.
        return min(self.peak_lr, max(self.min_lr, self.min_lr + (self.peak_lr - self.min_lr) * w))

    def boundaries(self) -> dict[str, float]:
        """Key points (tokens and LR) for printing a stage's schedule."""
        W, D, T = float(self.warmup_tokens), self.decay_start_tokens, float(self.horizon_tokens)
        return {
            "start_lr": self.lr(0),
            "warmup_end_tokens": W,
            "warmup_end_lr": self.lr(W),
            "decay_start_tokens": D,
            "decay_start_lr": self.lr(D),
            "end_tokens": T,
            "end_lr": self.lr(T),
        }


def plot_schedules(schedules: list[tuple[str, LRSchedule, int]], path: str | os.PathLike[str]) -> Path:
    """Plot LR against global tokens for consecutive stages ``(name, schedule, token_offset)``; atomic write."""
    if not schedules:
        raise ValueError("schedules: expected at least one (name, schedule, offset) stage (got [])")
    from matplotlib.figure import Figure  # lazy: keeps `import midtrain.schedule` light; Figure uses Agg

    fig = Figure(figsize=(9, 4), dpi=100)
    ax = fig.add_subplot()
    for name, sched, offset in schedules:
        T = sched.horizon_tokens
        b = sched.boundaries()
        xs = {T * i / 400 for i in range(401)}  # dense samples plus the exact corners
        xs |= {b["warmup_end_tokens"], b["decay_start_tokens"], max(0.0, b["warmup_end_tokens"] - 1e-9 * T)}
        pts = sorted(x for x in xs if 0 <= x <= T)
        ax.plot([offset + x for x in pts], [sched.lr(x) for x in pts], marker="o" if T == 0 else None, label=name)
        ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f" {name}", (offset, 1.0), xycoords=("data", "axes fraction"), va="bottom", fontsize=8)
    name, last, offset = schedules[-1]
    ax.axvline(offset + last.horizon_tokens, color="grey", linestyle="--", linewidth=0.8)  # end of the run
    ax.set_xlabel("global tokens")
    ax.set_ylabel("learning rate")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=out.suffix.lstrip(".") or "png")
    write_bytes_atomic(out, buffer.getvalue())  # readers never see a half-written image; mode as any new file
    return out
