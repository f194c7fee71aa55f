"""What packing every family correctly costs, side by side in one run (docs/MODELS.md):

* **Llama (full attention)**: `forward_packed` as it is (it now asks the family how to pack first) against the
  pre-family forward (the block-diagonal mask and per-document SDPA called directly): the dispatch must cost nothing.
* **Mistral-style sliding window shorter than the row**: per-layer-type masks (right) against the plain document
  mask (what midtrain did before: full attention inside each document, a different function from the model's).
* **LFM2-style convolution hybrid**: every document alone (right) against the packed row (state leaks across
  documents).

Each side is midtrain's real `Trainer.train_step()` in fp32 on the trainer benchmark's packed documents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import BenchResult, interleaved, register
from benchmarks.trainer import VOCAB, make_source, midtrain_step


def pre_family_forward(model, batch, **kwargs):
    """forward_packed before families: one document mask for every layer (per-document SDPA where it pays)."""
    from midtrain.model.attention import DocumentSegments, document_causal_mask, use_segments

    pos = batch["position_ids"]
    if use_segments(model, pos):
        plan = DocumentSegments.from_position_ids(pos)
        if plan.worth_it():
            from midtrain.model.attention import install_document_attention

            install_document_attention()
            kwargs["document_segments"] = plan
    return model(input_ids=batch["input_ids"], position_ids=pos, attention_mask=document_causal_mask(pos),
                 use_cache=False, **kwargs).logits


def single_mask_forward(model, batch):
    from midtrain.model.attention import document_causal_mask

    pos = batch["position_ids"]
    return model(input_ids=batch["input_ids"], position_ids=pos, attention_mask=document_causal_mask(pos),
                 use_cache=False).logits


def _config(model_type: str, **kwargs):
    from midtrain.model import preset_config

    base = preset_config("small-llama", vocab_size=VOCAB).to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "vocab_size")
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{k: base[k] for k in keep}, **kwargs)


@register("families", "what correct packing costs per family: Llama dispatch, sliding-window masks, documents alone")
def bench(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.model import forward_packed, preset_config

    seq_len, batch_tokens = (256, 2048) if quick else (1024, 8192)
    source = make_source(batch_tokens * 40)
    repeats = repeats or (3 if quick else 8)
    llama = preset_config("small-llama", vocab_size=VOCAB)
    mistral = _config("mistral", sliding_window=seq_len // 4)
    lfm2 = _config("lfm2", layer_types=["conv", "full_attention"] * 2, block_ff_dim=704)
    pairs = {
        "llama": (llama, forward_packed, pre_family_forward, "forward_packed / pre-family forward"),
        "mistral (window T/4)": (mistral, forward_packed, single_mask_forward, "layer masks / one document mask"),
        "lfm2 (conv hybrid)": (lfm2, forward_packed, single_mask_forward, "documents alone / packed row"),
    }
    rows, summary = [], []
    for family, (config, new, old, label) in pairs.items():
        torch.manual_seed(0)
        steps = {
            "correct": midtrain_step("small-llama", seq_len, batch_tokens, "fp32", source, config=config, forward=new),
            "before": midtrain_step("small-llama", seq_len, batch_tokens, "fp32", source, config=config, forward=old),
        }
        timing = interleaved(steps, warmup=1, repeats=repeats, log=log)
        for side, t in timing.items():
            rows.append({"family": family, "side": side, "median step s": round(t.median, 3),
                         "tokens/s": round(batch_tokens / t.median)})
        summary.append({"family": family, "ratio": label,
                        "time ratio": round(timing["correct"].median / timing["before"].median, 3)})
    return BenchResult("families", ["family", "side", "median step s", "tokens/s"], rows, summary,
                       notes=[f"seq_len {seq_len}, {batch_tokens} tokens per step, small-llama dimensions, fp32"])
