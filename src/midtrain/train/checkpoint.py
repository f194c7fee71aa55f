"""Atomic, world-size-independent checkpoints (docs/CONTRACTS.md §5).

A checkpoint is a directory `step-<N>` written as `step-<N>.tmp-<pid>`, fsynced and renamed; it counts as complete
only once `manifest.json` (sizes + sha256 of every file) is in it. Model and optimizer state are stored unsharded and
keyed by parameter name, so a checkpoint written by 2 ranks resumes on 1 and vice versa.
"""

from __future__ import annotations

import errno
import json
import random
import re
import resource
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from midtrain import faults
from midtrain.io import publish_dir, sha256_file
from midtrain.train.distributed import barrier

MODEL_FILE, OPTIM_FILE, STATE_FILE, RNG_FILE, MANIFEST = (
    "model.safetensors",
    "optimizer.pt",
    "trainer.json",
    "rng.pt",
    "manifest.json",
)
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(Exception):
    pass


# --------------------------------------------------------------------------- state collection (all ranks)


def _options(full: bool) -> StateDictOptions:
    # Without a process group torch's full-state-dict path wants a device mesh; the plain module is full anyway.
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if full else StateDictOptions()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=_options(dist.is_initialized()))
    # Own, contiguous fp32 copies: safetensors refuses shared storage (tied embeddings) and views.
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_options(dist.is_initialized()))


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save


def save_checkpoint(
    root: Path,
    global_step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    *,
    is_main: bool,
    keep_last: int,
    protect: tuple[int, ...] = (),
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every rank calls it (FSDP gathers shards); rank 0 writes. Returns the final directory.

    `extra_tensors` ({file name: tensors}) are written as further safetensors files (e.g. averaged weights).
    """
    weights = model_state(model)
    optim = optimizer_state(model, optimizer) if optimizer is not None else None
    final = root / f"step-{global_step}"
    if is_main:

        def write(tmp: Path) -> None:
            save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            if optim is not None:
                torch.save(optim, tmp / OPTIM_FILE)
            faults.point("ckpt.mid_write")  # test-only: shards written, manifest not
            torch.save(rng_state(), tmp / RNG_FILE)
            with open(tmp / STATE_FILE, "w") as fh:
                json.dump(trainer_state, fh, indent=2)
            for name, tensors in (extra_tensors or {}).items():
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            write_manifest(tmp, global_step)

        def failed(exc: BaseException, tmp: Path) -> CheckpointError | None:
            # torch/safetensors report ENOSPC as their own errors; the previous checkpoint is untouched
            if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
                return CheckpointError(_save_failed(exc, root, tmp, global_step))
            return None

        publish_dir(final, write, failed=failed)  # a re-run that reached the same step: the new one replaces it
        prune(root, keep_last, protect=(*protect, global_step))
    barrier()
    return final


def write_manifest(directory: Path, global_step: int) -> None:
    """Sizes and sha256 of every file in `directory`; written last, it marks the checkpoint complete."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(directory.iterdir())}
    with open(directory / MANIFEST, "w") as fh:
        json.dump({"global_step": global_step, "files": files}, fh, indent=2)


DISK_FULL = {errno.ENOSPC: "disk full (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)",
             errno.EFBIG: "file size limit exceeded (EFBIG)"}


def write_error(exc: BaseException, where: Path) -> str:
    """`PATH: disk full (ENOSPC)` and the like: why a write under `where` failed, naming the path.

    torch.save and safetensors turn a full disk into their own errors ("unexpected pos", "os error 28"), so those
    are diagnosed from the file system: free space, and the process's file-size limit against the file written.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return f"{exc.filename or where}: {DISK_FULL[exc.errno]}"
    written = max((p for p in where.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None) \
        if where.is_dir() else None
    path = written or where
    text = str(exc)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    if "os error 28" in text or "No space left" in text or (free is not None and free < 1 << 20):
        return f"{path}: disk full (ENOSPC; {free} bytes free)"
    if "os error 27" in text or (limit != resource.RLIM_INFINITY and written and written.stat().st_size >= limit):
        return f"{path}: file size limit exceeded (EFBIG; RLIMIT_FSIZE = {limit} bytes)"
    return f"{path}: write failed ({type(exc).__name__}: {text})"


def _save_failed(exc: BaseException, root: Path, tmp: Path, step: int) -> str:
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    return (f"{write_error(exc, tmp)} while saving checkpoint step-{step}; the partial checkpoint was removed and "
            f"{kept}; free space and run the same command to resume")


def prune(root: Path, keep_last: int, protect: tuple[int, ...] = ()) -> None:
    """Keeps the newest `keep_last` complete checkpoints (plus protected steps); removes stale temp dirs."""
    for tmp in root.glob("step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    steps = complete_steps(root)
    for step in steps[:-keep_last] if keep_last > 0 else steps:
        if step not in protect:
            shutil.rmtree(root / f"step-{step}", ignore_errors=True)


# --------------------------------------------------------------------------- find / load


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    steps = complete_steps(root)
    return root / f"step-{steps[-1]}" if steps else None


def resume_point(root: Path, *, fallback: bool = False, before: int | None = None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root` (with step < `before`) whose files match their manifest.

    A corrupted newest checkpoint is an error naming the file; with `fallback` older ones are tried instead, and the
    problems found come back with the checkpoint used (None when none verifies: the stage starts over, which the
    caller reports).
    """
    problems: list[str] = []
    for step in reversed(complete_steps(root)):
        if before is not None and step >= before:
            continue
        path = root / f"step-{step}"
        try:
            verify(path)
            return path, problems
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"{exc}; run again with --fallback-checkpoint to resume from the previous "
                                      "good checkpoint") from None
            problems.append(str(exc))
    return None, problems


def verify(path: Path) -> dict:
    """Checks every file against the manifest; a mismatch is an error naming the file."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest")
    for name, meta in manifest["files"].items():
        file = path / name
        if "/" in name or name.startswith(".") or not isinstance(meta, dict):  # its own files only
            raise CheckpointError(f"{manifest_path}: bad file name or entry {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        if file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (corrupted checkpoint)")
    return manifest


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_weights(path: Path, model: nn.Module) -> None:
    """Collective under FSDP: every rank reads the full file and keeps its shard."""
    state = load_file(str(path / MODEL_FILE))
    if dist.is_initialized():
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied output embeddings appear under one name only; anything else missing is a real mismatch.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{path / MODEL_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    file = path / OPTIM_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: this checkpoint holds no optimizer state")
    state = torch.load(file, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, state, options=_options(dist.is_initialized()))


def load_rng(path: Path) -> None:
    set_rng_state(torch.load(path / RNG_FILE, weights_only=False))
