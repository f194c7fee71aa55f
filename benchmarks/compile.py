"""`compile: true` (torch.compile of the model, as `midtrain run` does it) against eager midtrain and the plain loop.

Same model, data and step as the trainer benchmark (small-llama, fp32, 8192 tokens per step). The compiled model
attends through the dense 4D document mask (per-document attention is eager-only: its plan's Python ints would
recompile every step). Reports the compile cost (the first step's time minus a steady step) separately: compiling
pays only for runs that are long compared with it. Inductor caches its artefacts on disk (torch's FX graph and
AOTAutograd caches, on by default), so a second run of the same model starts faster; its warm-up figure shows that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import BenchResult, interleaved, register
from benchmarks.trainer import make_source, midtrain_step, plain_step


@register("compile", "recipe compile: true (torch.compile) vs eager midtrain vs the plain HF loop")
def bench_compile(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    preset, seq_lens, batch_tokens = ("tiny-llama", (256,), 4096) if quick else ("small-llama", (256, 1024), 8192)
    source = make_source(2_000_000)
    rows, summary = [], []
    for seq_len in seq_lens:
        torch._dynamo.reset()  # each group compiles afresh in this process (the on-disk caches stay)
        steps = {
            "midtrain compiled": midtrain_step(preset, seq_len, batch_tokens, "fp32", source, compiled=True),
            "midtrain eager": midtrain_step(preset, seq_len, batch_tokens, "fp32", source),
            "plain HF": plain_step(preset, seq_len, batch_tokens, False, source),
        }
        log(f"compile: {preset} seq {seq_len}, {batch_tokens} tokens/step")
        t = interleaved(steps, warmup=2, repeats=repeats or (2 if quick else 5), log=log)
        for name, timing in t.items():
            rows.append({"model": preset, "seq_len": seq_len, "loop": name, "step_s": timing.median,
                         "tokens_per_s": batch_tokens / timing.median, "first_step_s": timing.warmup[0],
                         "compile_s": timing.warmup[0] - timing.median if name == "midtrain compiled" else None,
                         "spread": timing.spread()})
        compiled, eager, plain = (t[k].median for k in ("midtrain compiled", "midtrain eager", "plain HF"))
        summary.append({"seq_len": seq_len, "comparison": "compiled / eager midtrain", "ratio": eager / compiled})
        summary.append({"seq_len": seq_len, "comparison": "compiled midtrain / plain HF", "ratio": plain / compiled})
        summary.append({"seq_len": seq_len, "comparison": "break-even steps (compile_s / time saved per step)",
                        "ratio": (t["midtrain compiled"].warmup[0] - compiled) / max(eager - compiled, 1e-9)})
    return BenchResult(
        name="compile",
        columns=["model", "seq_len", "loop", "step_s", "tokens_per_s", "first_step_s", "compile_s", "spread"],
        rows=rows,
        summary=summary,
        notes=["2 warm-up steps (the first compiles), then interleaved medians; compile_s = first step - median step",
               "break-even: steps after which the compiled run has caught up the compile time (negative or huge: "
               "compiling does not pay at this size)"],
    )
