"""A stage's Hugging Face export: full weights gathered from every rank, written by rank 0 with `midtrain.json`
(stage, step, tokens, LR, fingerprint) and a round-trip probe (fixed input ids and the logits they gave)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

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
    plain = build_model(unwrap_model(model).config, seed=0)
    plain.load_state_dict(weights, strict=False)
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
        save_hf_checkpoint(plain, ctx.tokenizer, out, extra=extra,
                           extra_tensors={PROBE_FILE: {"input_ids": probe_ids, "logits": probe_logits}})
    except (OSError, RuntimeError, SafetensorError) as exc:  # e.g. a full disk: say so instead of a traceback
        reason = ckpt.write_error(exc, out.parent)  # the partial export is already removed (io.publish_dir)
        raise ckpt.CheckpointError(
            f"{reason} while exporting stage {stage.name!r} to {out}; the partial export was removed and the "
            "stage's final checkpoint is intact; free space and run the same command to export again") from None
    barrier()
