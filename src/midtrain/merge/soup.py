"""Average HF checkpoints tensor by tensor in fp32, one shard at a time.

Peak memory is about one shard of the output plus one tensor per input, whatever the model size: tensors are read
lazily with `safe_open`, accumulated in fp32, cast back to the first checkpoint's dtype and written shard by shard in
the first checkpoint's shard layout. Checkpoints must share an architecture (config, parameter names and shapes) and
a tokenizer; anything else is a clear error that names the differing field, tensor or file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from midtrain.io import publish_dir, sha256_file

# Config keys that may differ between checkpoints of one architecture (bookkeeping, not shape or semantics).
_CONFIG_BOOKKEEPING = {"_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model")
_COPIED = ("config.json", "generation_config.json", *_TOKENIZER_FILES)


class MergeError(ValueError):
    pass


def _shards(ckpt: Path) -> dict[str, list[str]]:
    """{shard file name: [tensor names]} of a checkpoint (single file or index)."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise MergeError(f"{ckpt}: no model.safetensors or model.safetensors.index.json (not an HF checkpoint dir)")
    with safe_open(single, "pt") as f:
        return {"model.safetensors": list(f.keys())}


def _locations(ckpt: Path) -> dict[str, Path]:
    return {name: ckpt / shard for shard, names in _shards(ckpt).items() for name in names}


def _check_compatible(ckpts: Sequence[Path]) -> None:
    first = ckpts[0]
    configs = []
    for c in ckpts:
        path = c / "config.json"
        if not path.is_file():
            raise MergeError(f"{c}: no config.json (not an HF checkpoint dir)")
        configs.append({k: v for k, v in json.loads(path.read_text()).items() if k not in _CONFIG_BOOKKEEPING})
    for c, cfg in zip(ckpts[1:], configs[1:]):
        for key in sorted(set(configs[0]) | set(cfg)):
            if configs[0].get(key) != cfg.get(key):
                raise MergeError(f"architectures differ: config.{key} is {configs[0].get(key)!r} in {first} but "
                                 f"{cfg.get(key)!r} in {c}")
    for name in _TOKENIZER_FILES:
        present = [(c / name).is_file() for c in ckpts]
        if any(present) and not all(present):
            missing = next(c for c, p in zip(ckpts, present) if not p)
            raise MergeError(f"tokenizers differ: {missing} has no {name} but {first} does")
        if all(present) and len({sha256_file(c / name) for c in ckpts}) > 1:
            other = next(c for c in ckpts[1:] if sha256_file(c / name) != sha256_file(first / name))
            raise MergeError(f"tokenizers differ: {name} of {other} is not the same file as {first}'s")


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergeError(f"--weights has {len(weights)} values for {n} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights must be >= 0 with a positive sum (got {list(weights)})")
    total = float(sum(weights))
    return [w / total for w in weights]


def merge_checkpoints(
    checkpoints: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None
) -> Path:
    """Write the weighted mean of `checkpoints` (weights normalised to sum 1) to `out` atomically."""
    ckpts = [Path(c) for c in checkpoints]
    if len(ckpts) < 2:
        raise MergeError("need at least two checkpoints to merge")
    for c in ckpts:
        if not c.is_dir():
            raise MergeError(f"{c}: not a directory")
    w = normalized_weights(weights, len(ckpts))
    _check_compatible(ckpts)
    layout = _shards(ckpts[0])
    locations = [_locations(c) for c in ckpts]
    names = set(locations[0])
    for c, loc in zip(ckpts[1:], locations[1:]):
        if set(loc) != names:
            diff = sorted(names ^ set(loc))
            raise MergeError(f"parameter names differ between {ckpts[0]} and {c}: e.g. {diff[:3]}")

    def write(tmp: Path) -> None:
        _write_soup(ckpts, layout, locations, w, tmp)

    return publish_dir(Path(out), write)


def _write_soup(ckpts: list[Path], layout: dict, locations: list[dict], w: list[float], tmp: Path) -> None:
    """The weighted mean of `ckpts`, shard by shard in fp32, plus the first one's config and tokenizer, into tmp."""
    for shard, shard_names in layout.items():
        merged: dict[str, torch.Tensor] = {}
        for name in shard_names:
            acc: torch.Tensor | None = None
            dtype = None
            for c, loc, weight in zip(ckpts, locations, w):
                with safe_open(loc[name], "pt") as f:
                    tensor = f.get_tensor(name)
                if acc is None:
                    acc, dtype, shape = torch.zeros(tensor.shape, dtype=torch.float32), tensor.dtype, tensor.shape
                elif tensor.shape != shape:
                    raise MergeError(f"{name}: shape {tuple(tensor.shape)} in {c} but {tuple(shape)} in {ckpts[0]}")
                if not tensor.is_floating_point():  # integer buffers: must agree, taken as is
                    acc = tensor
                    continue
                acc.add_(tensor.float(), alpha=weight)
            merged[name] = acc.to(dtype) if acc.is_floating_point() else acc
        save_file(merged, tmp / shard, metadata={"format": "pt"})
        del merged
    if (ckpts[0] / "model.safetensors.index.json").is_file():
        shutil.copy2(ckpts[0] / "model.safetensors.index.json", tmp)
    for name in _COPIED:
        if (ckpts[0] / name).is_file():
            shutil.copy2(ckpts[0] / name, tmp / name)
    provenance = {"merged_from": [str(c) for c in ckpts], "weights": w}
    (tmp / "midtrain.json").write_text(json.dumps(provenance, indent=2) + "\n")
