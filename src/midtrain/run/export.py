"""A stage's Hugging Face export: full weights gathered from every rank, written by rank 0 with `midtrain.json`
(stage, step, tokens, LR, fingerprint) and a round-trip probe (fixed input ids and the logits they gave)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from midtrain.context.remap import has_rotary
from midtrain.model import build_model, save_hf_checkpoint, unwrap_model
from midtrain.plan import StagePlan
from midtrain.run.context import RunContext
from midtrain.train import checkpoint as ckpt
from midtrain.train.distributed import barrier
from midtrain.train.trainer import TrainerState

PROBE_FILE = "midtrain_probe.safetensors"


def export_stage(ctx: RunContext, stage: StagePlan, model, state: TrainerState, out: Path) -> None:
    """Collective: gathers full weights (FSDP), rank 0 writes the HF checkpoint plus a probe for round-trip checks."""
    weights = ckpt.model_state(model)
    if not ctx.dist.is_main:
        barrier()
        return
    trained = unwrap_model(model)
    dtype = export_dtype(ctx.recipe)
    plain = build_model(declared_config(trained.config, stage.seq_len), seed=0)
    plain.generation_config = copy.deepcopy(trained.generation_config)  # a preset's (or a base's without a file)
    plain.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v for k, v in weights.items()},
                          strict=False)  # the weights as written: the probe is what the export computes
    plain.eval()
    probe_ids = torch.arange(min(64, stage.seq_len)).remainder(len(ctx.tokenizer)).unsqueeze(0)
    with torch.no_grad():
        probe_logits = plain(input_ids=probe_ids, use_cache=False).logits.float()
    extra = {
        "stage": stage.name,
        "global_step": state.global_step,
        "tokens": state.global_tokens,
        "last_lr": state.last_lr,
        "fingerprint": stage.fingerprint,
        "seq_len": stage.seq_len,  # the context the stage trained at: the next extension's L0 (`rope show`)
    }
    try:
        save_hf_checkpoint(plain, ctx.tokenizer, out, extra=extra, dtype=dtype,
                           extra_tensors={PROBE_FILE: {"input_ids": probe_ids, "logits": probe_logits}},
                           generation_config_file=base_generation_config(ctx.recipe))
    except (OSError, RuntimeError, SafetensorError) as exc:  # e.g. a full disk: say so instead of a traceback
        reason = ckpt.write_error(exc, out.parent)  # the partial export is already removed (io.publish_dir)
        raise ckpt.CheckpointError(
            f"{reason} while exporting stage {stage.name!r} to {out}; the partial export was removed and the "
            "stage's final checkpoint is intact; free space and run the same command to export again") from None
    barrier()


def export_dtype(recipe) -> torch.dtype:
    """`export_dtype`, with auto = the dtype the base checkpoint declares (fp32 for a preset or an undeclared one)."""
    if recipe.export_dtype != "auto":
        return getattr(torch, recipe.export_dtype)
    base = recipe.base_ref
    if base.is_preset or not (Path(base.name) / "config.json").is_file():
        return torch.float32
    try:
        config = json.loads((Path(base.name) / "config.json").read_text())
    except ValueError:
        return torch.float32
    declared = config.get("dtype") or config.get("torch_dtype")
    return torch.bfloat16 if declared == "bfloat16" else torch.float32  # fp16 is not trained here


def base_generation_config(recipe) -> Path | None:
    """The base checkpoint's own generation_config.json (sampling defaults, stop ids), copied into every export as
    it is: whatever stage or init the weights came from, and even where transformers would refuse to save it again
    (e.g. a temperature without do_sample). None for a preset or a base without one."""
    base = recipe.base_ref
    if base.is_preset:
        return None
    local = Path(base.name) / "generation_config.json"
    if local.is_file():
        return local
    if base.allow_hub and not Path(base.name).exists():  # a hub base: the copy load_model downloaded, if any
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base.name, "generation_config.json")
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    return None


# RoPE kinds whose frequencies and scaling never read max_position_embeddings (yarn and longrope only once their
# factor is given; llama3, yarn and longrope read original_max_position_embeddings from rope_parameters instead).
# Dynamic NTK scales by seq_len / max_position_embeddings, at init and as it runs: declaring more would change it.
_POSITION_FREE_ROPE = frozenset({"default", "linear", "llama3", "proportional"})
_FACTOR_ROPE = frozenset({"yarn", "longrope"})


def _rope_reads_max_positions(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or {}
    per_type = [p for p in rope.values() if isinstance(p, dict)]
    for params in per_type or [rope]:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in _POSITION_FREE_ROPE or (kind in _FACTOR_ROPE and params.get("factor") is not None):
            continue
        return True
    return False


def declared_config(config, seq_len: int):
    """The config an export declares: a RoPE model's max_position_embeddings at least the length it trained at.
    (A learned position table cannot be declared longer than it is, and a RoPE whose scaling reads
    max_position_embeddings, as dynamic NTK does, keeps it: the export must compute what was trained.)"""
    out = copy.deepcopy(config)
    if (has_rotary(out) and (getattr(out, "max_position_embeddings", None) or 0) < seq_len
            and not _rope_reads_max_positions(out)):
        out.max_position_embeddings = seq_len
    return out
