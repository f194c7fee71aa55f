"""Training faults beyond a skipped update: which documents a skipped batch held, and rolling back to a checkpoint.

`step_guard.on_fault: skip` (default) skips a bad step's update (trainer.skip_reason). `rollback` instead restores
the newest good checkpoint of the stage (weights, optimizer, loader, RNG, counters), marks the offending batch, and
replays: the replayed steps reproduce the checkpoint's continuation exactly and the marked batch is consumed without
an update (`"skipped": "rollback"`). It helps where a skip cannot — weights already corrupted by an earlier update.
A stage with no checkpoint yet skips instead (logged). Every skipped batch's documents are logged
(`skipped_docs`: {source: [document index in the source's token cache]}) and the batch counts as consumed.
"""

from __future__ import annotations

from pathlib import Path

from midtrain.data.cursors import ReadPosition
from midtrain.data.loader import PackedLoader
from midtrain.train import checkpoint as ckpt
from midtrain.train.callbacks import MetricsWriter, truncate_metrics
from midtrain.train.distributed import DistInfo
from midtrain.train.state import Saved, TrainingState
from midtrain.train.trainer import Callback, StepSource, Trainer


class RollbackError(RuntimeError):
    """Faults keep coming back after `max_rollbacks` roll-backs: the run stops rather than loop."""


class DocumentLedger(Callback):
    """Wraps the step source and remembers the loader cursors around the last step, to name its documents.

    Placed first among the callbacks: a skipped step's row gets `skipped_docs` before the metrics writer sees it.
    """

    def __init__(self, inner: StepSource, loader: PackedLoader):
        self.inner, self.loader = inner, loader
        self.span: tuple[dict[str, ReadPosition], dict[str, ReadPosition]] | None = None

    def next_step(self):
        before = self.loader.read_positions()
        steps = self.inner.next_step()
        self.span = (before, self.loader.read_positions())
        return steps

    def last_documents(self) -> dict[str, list[int]]:
        """{source: document indices} the last step's global batch drew tokens from (all ranks' rows)."""
        if self.span is None:
            return {}
        before, after = self.span
        out: dict[str, list[int]] = {}
        for i, source in enumerate(self.loader.sources):
            b, a = before[source.name], after[source.name]
            n = max(1, a.n_docs)
            lo, hi = b.index, a.index
            positions = list(range(lo, hi))
            if a.offset and (hi != lo or a.offset != b.offset):
                positions.append(hi)  # a document cut by the batch's end
            docs = [int(self.loader.permutation(i, p // n)[p % n]) for p in positions]
            if docs:
                out[source.name] = docs
        return out

    def on_step_end(self, trainer: Trainer, row: dict) -> None:
        if row.get("skipped"):
            row["skipped_docs"] = self.last_documents()


class Rollback:
    """`Trainer.on_fault` for `step_guard.on_fault: rollback`; returns True when it restored a checkpoint."""

    def __init__(self, ckpt_root: Path, state: TrainingState, ledger: DocumentLedger, metrics: MetricsWriter,
                 dist: DistInfo, stage: str, max_rollbacks: int):
        self.root, self.state, self.ledger, self.metrics = ckpt_root, state, ledger, metrics
        self.dist, self.stage, self.max_rollbacks = dist, stage, max_rollbacks
        self.count = 0

    def __call__(self, trainer: Trainer, reason: str, loss: float) -> bool:
        fault_step = trainer.state.global_step + 1
        row = {"event": "rollback", "stage": self.stage, "fault_step": fault_step, "reason": reason, "loss": loss,
               "skipped_docs": self.ledger.last_documents()}
        good, problems = ckpt.resume_point(self.root, fallback=True, before=fault_step) if self.root.is_dir() \
            else (None, [])
        if good is None:  # nothing of this stage to go back to: the step's update is skipped instead
            self.metrics.write({**row, "step": trainer.state.global_step, "tokens": trainer.state.global_tokens,
                                "to_step": None, "note": "no checkpoint of this stage yet; update skipped"})
            return False
        if self.count >= self.max_rollbacks:
            raise RollbackError(f"stage {self.stage!r}: step {fault_step} {reason} after {self.count} roll-backs "
                                f"(step_guard.max_rollbacks); the run stops at its last checkpoint {good}")
        self.count += 1
        trainer.state = self.state.restore(Saved.read(good))  # monitors and weight averages rewind too
        trainer.forced_skips = {**trainer.forced_skips, fault_step: "rollback"}
        if self.dist.is_main:
            truncate_metrics(self.metrics.path, trainer.state.global_step)
        self.metrics.write({**row, "step": trainer.state.global_step, "tokens": trainer.state.global_tokens,
                            "to_step": trainer.state.global_step, "checkpoint": str(good),
                            "rejected_checkpoints": problems})
        return True
