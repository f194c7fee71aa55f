"""The memory options of a long-context stage on a real trainer step: `activation_checkpointing` and
`loss_chunk_tokens`, alone and together, against the default (time and the step's peak RSS).

small-llama at a 32k vocabulary (Llama-2/Mistral size; the head's logits are then the largest tensor), seq 4096,
8192 tokens per step, fp32, the same documents as the trainer benchmark. The numbers are equal on every side (the
options are exact: tests/train/test_activation_checkpointing.py, tests/train/test_chunked_loss.py); what moves is
where the memory goes and what it costs in time.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.common import BenchResult, interleaved, register
from benchmarks.trainer import make_source, midtrain_step

VOCAB = 32768


@register("memory", "activation checkpointing and chunked loss at seq 4096: step time and peak step memory")
def bench_memory(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    preset, seq_len, batch_tokens = ("tiny-llama", 1024, 4096) if quick else ("small-llama", 4096, 8192)
    source = make_source(2_000_000)
    options = {
        "default": {},
        "activation_checkpointing": {"checkpointing": True},
        "loss_chunk_tokens 1024": {"loss_chunk_tokens": 1024},
        "both": {"checkpointing": True, "loss_chunk_tokens": 1024},
    }
    steps = {name: midtrain_step(preset, seq_len, batch_tokens, "fp32", source, vocab=VOCAB, **kw)
             for name, kw in options.items()}
    log(f"memory: {preset} vocab {VOCAB}, seq {seq_len}, {batch_tokens} tokens/step, fp32")
    t = interleaved(steps, warmup=1, repeats=repeats or (2 if quick else 4), log=log)
    base = t["default"]
    rows = [{"option": name, "step_s": x.median, "tokens_per_s": batch_tokens / x.median, "step_rss_mb": x.step_rss_mb,
             "time_vs_default": x.median / base.median,
             "memory_vs_default": None if not base.step_rss_mb else x.step_rss_mb / base.step_rss_mb,
             "spread": x.spread()} for name, x in t.items()]
    return BenchResult(
        name="memory",
        columns=["option", "step_s", "tokens_per_s", "step_rss_mb", "time_vs_default", "memory_vs_default", "spread"],
        rows=rows,
        notes=[f"{preset}, vocab {VOCAB}, seq {seq_len}, {batch_tokens} tokens per step, fp32, midtrain's Trainer",
               "step_rss_mb: peak RSS during the configuration's first step minus RSS at its start (activations, "
               "logits, gradients, first-step optimizer state)"],
        extra={"preset": preset, "vocab": VOCAB, "seq_len": seq_len, "batch_tokens": batch_tokens},
    )
