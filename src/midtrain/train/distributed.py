"""Process-group setup and model wrapping: world size 1 on a laptop, torchrun with gloo (CPU) or nccl (GPU).

Nothing else in midtrain calls torch.distributed directly; everything goes through these helpers, so every
component works unchanged at world size 1 without a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(mode: str) -> DistInfo:
    """Reads torchrun's environment; creates the process group when more than one process runs."""
    world = launched_world_size()
    if world > 1 and mode == "none":
        raise ValueError(
            f"launched with WORLD_SIZE={world} but the recipe says distributed: none; set distributed: ddp or fsdp2"
        )
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums in place across ranks (no-op at world size 1)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, FSDP2's units: the family's own class (`_no_split_modules`), so GPT2Block and
    GPTNeoXLayer are found as well as *DecoderLayer."""
    from midtrain.model.families import decoder_layer_classes

    classes = decoder_layer_classes(model)
    return [m for m in model.modules() if isinstance(m, classes)]


def wrap_model(model: nn.Module, mode: str, info: DistInfo, *, fsdp_bf16_params: bool = False) -> nn.Module:
    """Wraps for data parallelism. Gradients end up averaged over ranks in every mode."""
    if not info.active or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if fsdp_bf16_params else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown distributed mode {mode!r}")
