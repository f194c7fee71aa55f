"""Checks of an HF checkpoint directory before it is used: what midtrain wrote is verified against the checksums it
recorded, and any checkpoint is checked to be loadable (valid config, complete weight files, matching vocabulary)
so that a damaged file is one error naming it, not a traceback from inside transformers.

Cost (docs/RELIABILITY.md): `verify_export` reads every file once (sha256, ~1 GB/s per core: about 30 s for a 7B
fp32 export); `check_loadable` reads only config.json and the safetensors headers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from midtrain.io import sha256_file

MANIFEST = "midtrain_files.json"  # {"files": {name: {"bytes": n, "sha256": hex}}} of every other file; written last


# The input embedding's weight as the families name it (Llama-style, GPT-2, GPT-NeoX); its rows are the vocabulary.
_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "embed_in.weight")


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, damaged or inconsistent; the message starts with the file's path."""


def write_manifest(directory: Path) -> None:
    """Records the size and sha256 of every file in `directory` (call last, once the directory is complete)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")


def verify_export(directory: Path) -> None:
    """Every file the manifest lists is there with its recorded size and sha256 (an export written before
    manifests existed passes unchecked; a missing manifest of one that had it is caught by its listed files)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFileError(f"{manifest_path}: unreadable ({exc})") from None
    for name, meta in listed.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointFileError(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise CheckpointFileError(f"{path}: checksum mismatch (the file changed after midtrain wrote it)")


def check_loadable(directory: Path) -> None:
    """config.json parses, every safetensors file is complete (its header and the data it declares), and the input
    embedding's rows match the config's vocab_size."""
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError as exc:
        raise CheckpointFileError(f"{config_path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CheckpointFileError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointFileError(f"{config_path}: expected a JSON object")
    model_type = config.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise CheckpointFileError(f"{config_path}: no model_type (transformers cannot tell which family it is)")
    if not config.get("auto_map") and not known_model_type(model_type):  # custom code may name its own type
        import transformers

        raise CheckpointFileError(f"{config_path}: unknown model_type {model_type!r} (transformers "
                                  f"{transformers.__version__} has no such family; a newer transformers may)")
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointFileError(f"{index_path}: unreadable shard index ({exc})") from None
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise CheckpointFileError(f"{directory / missing[0]}: missing, though {index_path.name} maps weights to "
                                      f"it ({len(missing)} of {len(shards)} shards missing)")
    text_config = config.get("text_config")
    vocab = config.get("vocab_size", text_config.get("vocab_size") if isinstance(text_config, dict) else None)
    for path in sorted(directory.glob("*.safetensors")):
        shapes = safetensors_shapes(path)
        embedding = next((shape for name, shape in shapes.items() if name.endswith(_EMBEDDING_NAMES)), None)
        if isinstance(vocab, int) and embedding and embedding[0] != vocab:
            raise CheckpointFileError(
                f"{config_path}: vocab_size {vocab} but {path.name} has an embedding of {embedding[0]} rows; fix "
                "vocab_size (or use the config the weights were saved with)")


def known_model_type(model_type: str) -> bool:
    """Whether the installed transformers has a config class for `model_type` (without importing the family)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors header, after checking that the file holds all the data it declares."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointFileError(f"{path}: truncated ({size} bytes, its header alone needs {header_len + 8})")
        try:
            header = json.loads(fh.read(header_len))
            tensors = {k: t for k, t in header.items() if k != "__metadata__"}
            end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
            shapes = {k: [int(n) for n in t["shape"]] for k, t in tensors.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointFileError(f"{path}: damaged safetensors header ({type(exc).__name__}: {exc}); copy it "
                                      "again or re-export it") from None
    if 8 + header_len + end > size:
        raise CheckpointFileError(f"{path}: truncated ({size} bytes of the {8 + header_len + end} its header "
                                  "declares); copy it again or re-export it")
    return shapes


def refuse_remote_code(directory: Path) -> None:
    """A config.json naming custom modeling code (`auto_map`) runs that code when loaded: only by opt-in."""
    config_path = directory / "config.json"
    try:
        auto_map = json.loads(config_path.read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # check_loadable reports an unreadable config
    if auto_map:
        raise CheckpointFileError(
            f"{config_path}: the model needs custom code from its repository (auto_map: "
            f"{', '.join(sorted(auto_map))}); set `trust_remote_code: true` in the recipe to run it")
