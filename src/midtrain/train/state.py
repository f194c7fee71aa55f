"""A stage's training state as one unit: what a checkpoint holds, and saving, restoring and averaging it.

The parts: model weights, optimizer, the loader's position, the trainer's counters, the RNGs, and the callbacks that
hold state (gradient noise scale, weight averages: `CheckpointPart`). A stage resumes through `restore`, a step-guard
roll-back goes back through it too, and a souped stage's checkpoint is the `average_checkpoints` of its branches'.
The file format is midtrain.train.checkpoint's (atomic, manifest with checksums, world-size independent).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from midtrain.data.cursors import furthest_cursors
from midtrain.data.loader import PackedLoader
from midtrain.io import publish_dir
from midtrain.model import unwrap_model
from midtrain.train import checkpoint as ckpt
from midtrain.train.trainer import TrainerState


class CheckpointPart(Protocol):
    """A callback whose state a checkpoint keeps: JSON under `key` in trainer.json, optionally tensor files."""

    key: str

    def checkpoint_state(self) -> dict: ...

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]: ...  # {file name: tensors}; may be empty

    def restore(self, checkpoint: Path, model: nn.Module, state: dict | None) -> None: ...


@dataclass
class Saved:
    """What a checkpoint's trainer.json says, read before the model and optimizer exist (to size the optimizer's
    learning rate and count where the stage is)."""

    path: Path
    record: dict

    @classmethod
    def read(cls, path: Path) -> Saved:
        return cls(path, ckpt.read_trainer_state(path))

    @property
    def trainer(self) -> TrainerState:
        return TrainerState(**self.record["trainer"])

    @property
    def forced_skips(self) -> dict[int, str]:
        """The batches earlier roll-backs marked (consumed without an update on replay)."""
        return {int(k): v for k, v in self.record.get("forced_skips", {}).items()}

    @property
    def source_cursors(self) -> dict[str, dict]:
        """Per source, where the stage's reading stopped: what the next stage starts from."""
        return self.record["loader_cursors"]

    @property
    def fingerprint(self) -> str | None:
        return self.record.get("fingerprint")


@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    loader: PackedLoader
    stage: str
    fingerprint: str
    parts: list[CheckpointPart] = field(default_factory=list)

    def save(self, root: Path, state: TrainerState, forced_skips: dict[int, str], *, is_main: bool,
             keep_last: int, protect: tuple[int, ...] = ()) -> Path:
        """Collective (FSDP gathers shards; rank 0 writes) `root/step-<global step>`."""
        record = {
            "trainer": vars(state).copy(),
            "loader": self.loader.state_dict(),
            "loader_cursors": self.loader.source_cursors(),
            "fingerprint": self.fingerprint,
            "stage": self.stage,
            **{part.key: part.checkpoint_state() for part in self.parts},
            "forced_skips": {str(k): v for k, v in forced_skips.items()},
        }
        tensors = {name: t for part in self.parts for name, t in part.checkpoint_tensors().items()}
        return ckpt.save_checkpoint(root, state.global_step, self.model, self.optimizer, record, is_main=is_main,
                                    keep_last=keep_last, protect=protect, extra_tensors=tensors or None)

    def restore(self, saved: Saved, *, optimizer: bool = True) -> TrainerState:
        """Everything back to `saved`: weights, optimizer, RNGs, loader, state parts; returns the counters."""
        model = self.model if torch.distributed.is_initialized() else unwrap_model(self.model)
        ckpt.load_weights(saved.path, model)
        if optimizer and self.optimizer is not None:
            ckpt.load_optimizer(saved.path, self.model, self.optimizer)
        ckpt.load_rng(saved.path)
        self.loader.load_state_dict(saved.record["loader"])
        for part in self.parts:
            part.restore(saved.path, self.model, saved.record.get(part.key))
        return saved.trainer


def average_checkpoints(sources: list[Path], root: Path, global_step: int) -> Path:
    """`root/step-<N>` as the soup of the branches' final checkpoints: fp32 mean of their weights; optimizer state,
    RNG and counters of the first; per source the loader cursor of whichever branch read furthest. Atomic."""
    for src in sources:
        ckpt.verify(src)
    root.mkdir(parents=True, exist_ok=True)
    mean: dict[str, torch.Tensor] = {}
    for src in sources:
        for name, tensor in load_file(str(src / ckpt.MODEL_FILE)).items():
            acc = mean.setdefault(name, torch.zeros_like(tensor, dtype=torch.float32))
            acc.add_(tensor.float(), alpha=1.0 / len(sources))
    record: dict[str, Any] = ckpt.read_trainer_state(sources[0])
    record["loader_cursors"] = furthest_cursors([ckpt.read_trainer_state(s)["loader_cursors"] for s in sources])
    record["soup_of"] = [str(s) for s in sources]

    def write(tmp: Path) -> None:
        save_file(mean, str(tmp / ckpt.MODEL_FILE), metadata={"format": "pt"})
        for name in (ckpt.OPTIM_FILE, ckpt.RNG_FILE):
            if (sources[0] / name).is_file():
                shutil.copyfile(sources[0] / name, tmp / name)  # streamed: optimizer state can be many GB
        (tmp / ckpt.STATE_FILE).write_text(json.dumps(record, indent=2))
        ckpt.write_manifest(tmp, global_step)

    return publish_dir(root / f"step-{global_step}", write)
