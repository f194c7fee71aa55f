"""The stage loop: accumulate, clip, step, account tokens, call back. Knows nothing of RoPE methods or data sources.

The model is called through `forward` (a callable taking a batch dict, returning logits, or logits and an auxiliary
loss to add, e.g. an MoE router's), the data through
`next_step()` (the micro-batches of one optimizer step for this rank), the LR through the stage plan (a pure
function of tokens), and everything else — metrics, progress, validation, checkpoints — through callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from midtrain import faults
from midtrain.model.loss import label_count, token_loss_sums
from midtrain.plan import StagePlan
from midtrain.train.distributed import DistInfo, all_reduce_sum
from midtrain.train.optim import set_lr

Batch = dict[str, torch.Tensor]


class StepSource(Protocol):
    def next_step(self) -> list[Batch]: ...


class Callback:
    """Hooks the trainer calls on every rank; most callbacks act on the main rank only."""

    def on_stage_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, row: dict) -> None: ...

    def on_micro_batch_end(self, trainer: Trainer, index: int, n_tokens: int) -> None:
        """After micro-batch `index`'s backward (before the next accumulates); `n_tokens` = its predicted tokens on
        this rank. Its gradient is scaled by world_size / trainer.step_label_count (the global count)."""

    def on_stage_end(self, trainer: Trainer) -> None: ...


@dataclass
class TrainerState:
    """Counters that, with the loader state, locate a run exactly."""

    stage_step: int = 0  # optimizer steps done in this stage
    global_step: int = 0  # optimizer steps done in the run
    global_tokens: int = 0
    last_lr: float | None = None
    loss_ema: float | None = None  # of applied steps; the spike guard's reference (checkpointed: exact resume)
    skipped_steps: int = 0


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: StepSource
    stage: StagePlan
    forward: Callable[[nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]  # logits[, aux loss]
    dist: DistInfo
    domains: Sequence[str]  # domain name of each source id
    precision: str = "bf16-mixed"
    grad_clip: float | None = 1.0
    callbacks: list[Callback] = field(default_factory=list)
    state: TrainerState = field(default_factory=TrainerState)
    should_stop: bool = False  # callbacks may set it (e.g. on a preemption signal)
    skip_nonfinite: bool = True  # a NaN/inf loss or gradient norm skips the update (the batch counts as consumed)
    spike_factor: float | None = None  # skip the update when loss > spike_factor x the EMA of applied steps' loss
    # step_guard.on_fault=rollback (midtrain.train.rollback): restores the last good checkpoint and returns True, and
    # the faulty step is discarded; `forced_skips` (global step -> reason) are batches a rollback marked to skip.
    on_fault: Callable[[Trainer, str, float], bool] | None = None
    forced_skips: dict[int, str] = field(default_factory=dict)
    step_label_count: float = 0.0  # predicted tokens of the current step over all ranks (the loss normaliser)
    # backward writes the logits' gradient into their own storage (midtrain.model.loss.inplace_cross_entropy): no
    # fresh logits-sized buffers per micro-batch; False computes the same loss with F.cross_entropy
    inplace_loss: bool = True

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.precision == "bf16-mixed"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=enabled)

    def fit(self) -> TrainerState:
        for cb in self.callbacks:
            cb.on_stage_start(self)
        while self.state.stage_step < self.stage.steps and not self.should_stop:
            row = self.train_step()
            if row is None:  # rolled back to a checkpoint: the step never happened
                continue
            for cb in self.callbacks:
                cb.on_step_end(self, row)
        for cb in self.callbacks:
            cb.on_stage_end(self)
        return self.state

    def train_step(self) -> dict | None:
        start = time.perf_counter()
        lr = self.stage.lr_at_step(self.state.stage_step)
        set_lr(self.optimizer, lr)
        micro_batches = [{k: v.to(self.dist.device) for k, v in mb.items()} for mb in self.loader.next_step()]

        # Normalise by the *global* label count so any split into ranks and micro-batches gives the same gradient.
        n_labels = [label_count(mb["labels"]) for mb in micro_batches]
        count = torch.tensor(
            [sum(n_labels)], dtype=torch.float64, device=self.dist.device
        )  # on the device: NCCL reduces only device tensors
        global_count = max(float(all_reduce_sum(count).item()), 1.0)
        self.step_label_count = global_count
        n_sources = len(self.domains)
        sums = torch.zeros(1 + 2 * n_sources, dtype=torch.float64, device=self.dist.device)  # one sync per step
        aux_sum: torch.Tensor | None = None  # label-weighted auxiliary loss, when the forward returns one
        for i, mb in enumerate(micro_batches):
            with self._sync_context(last=i == len(micro_batches) - 1):
                with self.autocast:
                    logits = self.forward(self.model, mb)
                # A forward may also return an auxiliary loss (e.g. an MoE router's, coefficient included): a mean over
                # the micro-batch, weighted by its share of the step's labels like the token loss.
                logits, aux = logits if isinstance(logits, tuple) else (logits, None)
                loss_sum, per_source, counts = token_loss_sums(logits, mb["labels"], mb["source_ids"], n_sources,
                                                               reuse_logits=self.inplace_loss)
                # Data-parallel wrappers average gradients over ranks; scaling by world size turns that into a sum.
                objective = loss_sum * (self.dist.world_size / global_count)
                if aux is not None:
                    objective = objective + aux * (n_labels[i] * self.dist.world_size / global_count)
                    weighted = aux.detach().double().reshape(1) * n_labels[i]
                    aux_sum = weighted if aux_sum is None else aux_sum + weighted
                objective.backward()
            for cb in self.callbacks:
                cb.on_micro_batch_end(self, i, n_labels[i])
            sums += torch.cat([loss_sum.detach().reshape(1), per_source, counts]).double()
            del logits

        faults.point("train.mid_step", self.model.parameters)  # test-only; a no-op unless MIDTRAIN_FAULT is set
        all_reduce_sum(sums)  # before the update: every rank decides on the same global loss
        sums = sums.cpu()
        loss = float(sums[0] / global_count)
        aux_loss = None if aux_sum is None else float(all_reduce_sum(aux_sum).item() / global_count)
        grad_norm = self._clip()
        skipped = skip_reason(loss, grad_norm, self.state.loss_ema, self.skip_nonfinite, self.spike_factor)
        forced = self.forced_skips.get(self.state.global_step + 1)  # a batch a rollback marked: never applied
        if skipped and not forced and self.on_fault is not None and self.on_fault(self, skipped, loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        skipped = forced or skipped
        if skipped is None:
            self.optimizer.step()
            ema = self.state.loss_ema
            self.state.loss_ema = loss if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * loss
        else:
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

        tokens = self.stage.batch_tokens
        self.state.stage_step += 1
        self.state.global_step += 1
        self.state.global_tokens += tokens
        self.state.last_lr = lr
        elapsed = time.perf_counter() - start
        row = {
            "event": "train",
            "step": self.state.global_step,
            "tokens": self.state.global_tokens,
            "stage": self.stage.name,
            "stage_step": self.state.stage_step,
            "stage_tokens": self.state.stage_step * tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else math.inf,
        }
        if skipped is not None:
            row["skipped"] = skipped
        if aux_loss is not None:
            row["aux_loss"] = aux_loss
        per_domain: dict[str, list[float]] = {}
        for src, domain in enumerate(self.domains):
            loss_sum, n = float(sums[1 + src]), float(sums[1 + n_sources + src])
            if n > 0:
                acc = per_domain.setdefault(domain, [0.0, 0.0])
                acc[0] += loss_sum
                acc[1] += n
        for domain, (loss_sum, n) in sorted(per_domain.items()):
            row[f"loss.{domain}"] = loss_sum / n
        return row

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Skips the gradient all-reduce on all but the last micro-batch of a step."""
        if last:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)


EMA_DECAY = 0.9


def skip_reason(
    loss: float, grad_norm: float, loss_ema: float | None, skip_nonfinite: bool, spike_factor: float | None
) -> str | None:
    """Why this step's update should be skipped ("nonfinite" / "spike"), or None to apply it."""
    if skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return "nonfinite"
    if spike_factor is not None and loss_ema is not None and loss > spike_factor * loss_ema:
        return "spike"
    return None


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
