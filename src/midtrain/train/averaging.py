"""EMA / tail (Polyak) averaging of the weights over a stage's last phase, as a trainer callback.

From `start` (the schedule's decay start, or a token count of the stage) every optimizer step folds the new weights
into an fp32 shadow copy: `tail` keeps their arithmetic mean, `ema` shadow <- decay·shadow + (1 − decay)·weights
(started at the first averaged step's weights, so no zero-bias to correct). Training itself never sees the shadow.
At the stage's end `midtrain run` exports and evaluates the raw weights to `stages/<stage>/hf-raw/`
(eval/<stage>.raw.json), then copies the shadow into the model, so the stage's export `stages/<stage>/hf/` — what
the next stage loads and the gate judges — holds the average. The raw weights also stay in the stage's final
checkpoint; the shadow is checkpointed beside them (`average.safetensors`) for an exact resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from midtrain.config.recipe import AverageConfig
from midtrain.model import unwrap_model
from midtrain.plan import StagePlan
from midtrain.train.trainer import Callback, Trainer

FILE = "average.safetensors"


def start_tokens(config: AverageConfig, stage: StagePlan) -> float:
    """Stage tokens from which steps are averaged: a step taken after >= this many tokens counts."""
    return stage.schedule.decay_start_tokens if config.start == "decay" else float(config.start)


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) once per parameter (tied weights under their first name), as HF names them."""
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


class WeightAverager(Callback):
    """Keeps the fp32 average of the weights after each step from `start` on (main and other ranks alike).

    Must come before the checkpoint callback, so a checkpoint at a step holds the average including that step.
    """

    def __init__(self, config: AverageConfig, stage: StagePlan):
        self.kind, self.decay = config.kind, config.decay
        self.start = start_tokens(config, stage)
        self.on_cpu = config.device == "cpu"
        self.shadow: dict[str, torch.Tensor] | None = None
        self.count = 0  # steps averaged so far

    def _include(self, trainer: Trainer) -> bool:
        done = trainer.state.stage_step  # the step just taken had index done - 1 and saw (done - 1) * B tokens
        return (done - 1) * trainer.stage.batch_tokens >= self.start

    @torch.no_grad()
    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if not self._include(trainer):
            return
        params = _unique_params(trainer.model)
        current = [p.detach().to("cpu" if self.on_cpu else p.device, torch.float32) for _, p in params]
        self.count += 1
        if self.shadow is None:
            self.shadow = {n: t.clone() for (n, _), t in zip(params, current)}
            return
        weight = 1.0 / self.count if self.kind == "tail" else 1.0 - self.decay  # running mean / EMA
        torch._foreach_lerp_([self.shadow[n] for n, _ in params], current, weight)

    # ---- checkpoint / export (a midtrain.train.state.CheckpointPart) ----
    key = "average"

    def checkpoint_state(self) -> dict:
        """For trainer.json: what the shadow file means."""
        return {"kind": self.kind, "decay": self.decay, "start_tokens": self.start, "count": self.count}

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The shadow as CPU fp32 tensors in its own file (nothing before the first averaged step)."""
        return {FILE: self.tensors()} if self.count else {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shadow as CPU fp32 tensors (empty before the first averaged step)."""
        return {n: t.detach().to("cpu").contiguous() for n, t in (self.shadow or {}).items()}

    def restore(self, checkpoint: Path, model: nn.Module, state: dict | None) -> None:
        """Restores the shadow saved in `checkpoint` (none before the first averaged step): on resume, and when a
        step-guard roll-back goes back to it."""
        self.count = int((state or {}).get("count", 0))
        file = checkpoint / FILE
        if self.count == 0 or not file.is_file():
            self.shadow, self.count = None, 0
            return
        saved = load_file(str(file))
        self.shadow = {n: saved[n].to("cpu" if self.on_cpu else p.device, torch.float32)
                       for n, p in _unique_params(model)}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Puts the averaged weights into the model (at the stage's end, after its final checkpoint)."""
        if self.shadow is None:
            return
        for name, p in _unique_params(model):
            p.copy_(self.shadow[name].to(p.device, p.dtype))
