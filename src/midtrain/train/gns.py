"""Gradient noise scale monitor (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A).

B_simple = tr(Σ) / |G|², with Σ the per-token gradient covariance and G the true gradient, estimated from the norms
of the same step's gradient at two batch sizes (in tokens): the first micro-batch's (B_small, local to this rank,
read right after its backward) and the accumulated step's (B_big, the global batch, the norm the trainer clips):

    |G|²   ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Both are unbiased but noisy, so (as the paper recommends) each is smoothed by its own EMA and the ratio is taken of
the smoothed values. Cost: one gradient norm (and, under DDP, one 2-float all-reduce) every `every_steps` steps.
"""

from __future__ import annotations

import math

import torch

from midtrain.train.distributed import all_reduce_sum
from midtrain.train.trainer import Callback, Trainer


def gns_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates (|G|², tr(Σ)) from squared norms of mean gradients over b_small < b_big examples."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < B_small < B_big, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    tr_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr_sigma


class GradientNoiseScale(Callback):
    """Adds `gns`, `gns_tr_sigma`, `gns_g2` (EMA-smoothed) to the train rows of measured steps.

    Must come before the metrics writer in the callback list (it edits the row that writer logs).
    """

    def __init__(self, every_steps: int, ema: float = 0.95):
        self.every, self.decay = every_steps, ema
        self.ema_g2: float | None = None
        self.ema_tr_sigma: float | None = None
        self.measurements = 0
        self.last: tuple[float, float] | None = None  # this step's unsmoothed (|G|², tr(Σ)), for tests and plots
        self._small: tuple[float, int] | None = None  # (|G_small|², B_small) of the step in flight
        self._micro_seen = 0
        self._warned = False

    # ---- state (checkpointed in trainer.json: a resumed run continues the same EMAs; a CheckpointPart) ----
    key = "gns"

    def checkpoint_state(self) -> dict:
        return self.state_dict()

    def checkpoint_tensors(self) -> dict:
        return {}

    def restore(self, checkpoint, model, state: dict | None) -> None:
        """On resume, and when a step-guard roll-back goes back to `checkpoint`: continue the EMAs saved there."""
        self.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"ema_g2": self.ema_g2, "ema_tr_sigma": self.ema_tr_sigma, "measurements": self.measurements}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.ema_g2, self.ema_tr_sigma = state.get("ema_g2"), state.get("ema_tr_sigma")
        self.measurements = int(state.get("measurements", 0))

    @property
    def b_simple(self) -> float:
        if self.ema_g2 is None or self.ema_tr_sigma is None or self.ema_g2 <= 0:
            return math.nan  # |G|² not (yet) resolved above the noise
        return self.ema_tr_sigma / self.ema_g2

    # ---- hooks ----
    def _measuring(self, trainer: Trainer) -> bool:
        return (trainer.state.stage_step + 1) % self.every == 0  # stage_step counts steps done before this one

    def on_micro_batch_end(self, trainer: Trainer, index: int, n_tokens: int) -> None:
        if not self._measuring(trainer):
            return
        self._micro_seen = index + 1
        if index != 0 or n_tokens == 0:
            return
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        if not grads:
            return
        raw_sq = float(torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum())
        # The backward ran on loss_sum * W / global_count: rescale to the mean gradient over this micro-batch.
        scale = trainer.step_label_count / (trainer.dist.world_size * n_tokens)
        self._small = (raw_sq * scale * scale, n_tokens)

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        small, self._small = self._small, None
        if trainer.state.stage_step % self.every:  # not a measured step (stage_step now counts this one)
            return
        if self._micro_seen < 2:  # one micro-batch per rank: its gradient is the step's (or all-reduced) one
            if not self._warned and trainer.dist.is_main:
                print("warning: gradient noise scale needs >= 2 micro-batches per step; not measured", flush=True)
            self._warned = True
            return
        local = [0.0, 0.0, 0.0]  # (|G|², tr(Σ), 1) of this rank, or zeros: every rank joins the all-reduce
        if small is not None and small[1] < trainer.step_label_count:
            local = [*gns_estimates(small[0], row["grad_norm"] ** 2, small[1], trainer.step_label_count), 1.0]
        if trainer.dist.world_size > 1:  # every rank's first micro-batch is its own small batch: average them
            local = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=trainer.dist.device)).tolist()
        g2, tr_sigma, n = local
        if n == 0 or "skipped" in row or not (math.isfinite(g2) and math.isfinite(tr_sigma)):
            return  # a step the guard rejected says nothing about the noise scale
        g2, tr_sigma = g2 / n, tr_sigma / n
        self.last = (g2, tr_sigma)
        if self.ema_g2 is None or self.ema_tr_sigma is None:
            self.ema_g2, self.ema_tr_sigma = g2, tr_sigma
        else:
            self.ema_g2 = self.decay * self.ema_g2 + (1 - self.decay) * g2
            self.ema_tr_sigma = self.decay * self.ema_tr_sigma + (1 - self.decay) * tr_sigma
        self.measurements += 1
        row.update(gns=self.b_simple, gns_tr_sigma=self.ema_tr_sigma, gns_g2=self.ema_g2)
