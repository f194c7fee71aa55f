"""Hugging Face model I/O: build from a config, load a local checkpoint, export atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from midtrain import faults
from midtrain.io import publish_dir
from midtrain.layout import EXPORT_INFO
from midtrain.model.families import choose_attention
from midtrain.model.presets import check_rope_support
from midtrain.model.verify import CheckpointFileError, check_loadable, refuse_remote_code, write_manifest

_WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")


def unwrap_model(model: torch.nn.Module) -> PreTrainedModel:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting order."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model  # type: ignore[return-value]


def build_model(config: PretrainedConfig, seed: int, *, attn_implementation: str = "auto") -> PreTrainedModel:
    """A freshly initialised fp32 model, identical for a given seed; the global RNG is left untouched.
    `attn_implementation` "auto": what `midtrain.model.families.choose_attention` picks for the family."""
    check_rope_support(config)
    impl = choose_attention(config, attn_implementation).implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    # A KV cache in training skips transformers' packed-sequence handling (REFERENCE §5).
    model.config.use_cache = False
    return model


def _check_local_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} path {str(path)!r} is not a directory")


# What transformers raises from inside from_pretrained on a checkpoint it cannot use (a config field its dataclass
# validation refuses, a damaged weight file): one line naming the checkpoint instead of a traceback.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, StrictDataclassError, SafetensorError)


def load_model(
    path: str | Path, *, allow_hub: bool = False, attn_implementation: str = "auto", trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a causal LM in fp32 from a local checkpoint dir (a hub id only with `allow_hub`).

    `attn_implementation` "auto" loads with sdpa where the family offers it, else eager (transformers' own choice
    when given none, the same rule as `choose_attention`): a family without sdpa (Gemma 2, gpt-oss) is not refused.
    A checkpoint whose config names custom code (`auto_map`) is refused unless `trust_remote_code`.
    """
    local = Path(path)
    if not (allow_hub and not local.exists()):
        _check_local_dir(local, "model checkpoint")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model checkpoint {str(local)!r} has no config.json")
        if not any(any(local.glob(p)) for p in _WEIGHT_PATTERNS):
            raise FileNotFoundError(
                f"model checkpoint {str(local)!r} has no weights ({' or '.join(_WEIGHT_PATTERNS)})"
            )
        check_loadable(local)  # a damaged file is one error naming it, not a traceback from inside transformers
        if not trust_remote_code:
            refuse_remote_code(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch.float32,
            attn_implementation=None if attn_implementation == "auto" else attn_implementation,
            local_files_only=not allow_hub,
            trust_remote_code=trust_remote_code,
        )
    except _LOAD_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointFileError(f"{path}: transformers cannot load this checkpoint: {first}") from None
    model.config.use_cache = False  # training default, as in build_model; generate() reads generation_config
    return model


def load_tokenizer(path: str | Path, *, allow_hub: bool = False) -> Any:
    """Load a tokenizer from a local dir (a hub id only with `allow_hub`)."""
    local = Path(path)
    if not (allow_hub and not local.exists()):
        _check_local_dir(local, "tokenizer")
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((local / f).is_file() for f in files):
            raise FileNotFoundError(f"tokenizer directory {str(local)!r} has none of {', '.join(files)}")
    try:
        if _declares_generic_fast_tokenizer(local):
            # AutoTokenizer overrides a generic class with the model type's own for some types (qwen2 ->
            # Qwen2Tokenizer, which rebuilds its own pipeline): a tokenizer we trained would silently change.
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=not allow_hub)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=not allow_hub)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load a tokenizer from {str(path)!r}: {e}") from e


def _declares_generic_fast_tokenizer(local: Path) -> bool:
    cfg = local / "tokenizer_config.json"
    if not (cfg.is_file() and (local / "tokenizer.json").is_file()):
        return False
    declared = json.loads(cfg.read_text()).get("tokenizer_class")
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Unique parameter counts (tied weights once).

    `embedding` is the input token embedding; `lm_head` the output projection (0 when tied). `non_embedding`
    = total - embedding: it keeps an untied lm_head because that is a matmul (what 6·N·tokens MFU counts).
    """
    model = unwrap_model(model)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once; the id set is belt and braces
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = 0 if out is None or out.weight is emb else out.weight.numel()
    return {"total": total, "embedding": emb.numel(), "lm_head": head, "non_embedding": total - emb.numel()}


def save_hf_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any | None,
    out_dir: str | Path,
    *,
    extra: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    dtype: torch.dtype = torch.float32,
    generation_config_file: str | Path | None = None,
) -> Path:
    """Export a loadable HF checkpoint (safetensors in `dtype`, config, generation config, tokenizer) atomically.

    Written into `out_dir.tmp-<pid>`, fsynced, then renamed over `out_dir`, so readers see the old export or the
    new one, never a partial one. `state_dict` overrides the model's own (e.g. a gathered FSDP full state dict).
    `extra` is written as `midtrain.json`, `extra_tensors` ({file name: tensors}) as further safetensors files (e.g.
    a round-trip probe), and `midtrain_files.json` last with the size and sha256 of every other file. The model's
    config is left as it was. `generation_config_file` (the base's generation_config.json) is copied as it is in
    place of the model's generation config. Call on one rank only.
    """
    inner = unwrap_model(model)
    config = inner.config

    if state_dict is None:
        state_dict = inner.state_dict()
    state_dict = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state_dict.items()}
    dtype_name = str(dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        saved = {k: getattr(config, k, None) for k in ("use_cache", "dtype", "architectures")}
        generation = getattr(inner, "generation_config", None)
        try:
            config.use_cache = True  # users' generate() of the export should use the KV cache
            if generation_config_file is not None and generation is not None:
                # save_pretrained validates it strictly; the base's file is copied below, whatever it holds
                inner.generation_config = GenerationConfig()
            inner.save_pretrained(tmp, state_dict=state_dict)
        finally:
            for k, v in saved.items():  # save_pretrained writes dtype/architectures into the live config
                setattr(config, k, v)
            if generation is not None:
                inner.generation_config = generation
        _patch_json(tmp / "config.json", {"use_cache": True, "dtype": dtype_name})
        if generation_config_file is not None:
            shutil.copyfile(generation_config_file, tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / name))
        if extra is not None:
            (tmp / EXPORT_INFO).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp)  # last: sizes and sha256 of every other file (model.verify.verify_export)
        faults.point("export.mid_write")  # test-only: export complete in its temp dir, not yet in place

    return publish_dir(Path(out_dir), write)


def _patch_json(path: Path, values: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    if all(data.get(k) == v for k, v in values.items()):
        return
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
