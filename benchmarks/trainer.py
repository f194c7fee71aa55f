"""Training throughput: midtrain's real `Trainer` against the plain Hugging Face loop from the transformers docs.

Both sides train the same model (`preset_config(...)`, same init seed), on the same token ids (two `PackedLoader`s
with the same seed over the same in-memory documents, a few per row), with the same global batch and seq_len.

* **midtrain**: `Trainer.train_step()` with `PackedLoader`, `forward_packed` (document-confined attention: one
  `is_causal` SDPA call per group of similar-length documents on CPU), the in-place cross-entropy, `build_optimizer`
  (fused AdamW, weight-decay groups), grad clipping at 1.0, a cosine `StagePlan` from `build_plan`, `callbacks=[]`.
  Precision `resolve_precision("auto", cpu)` (its default), plus explicit `fp32` and `bf16-mixed`.
* **midtrain reference path** (fp32 only): the same trainer with the dense 4D document mask
  (`forward_packed(segments=False)`) and `F.cross_entropy` (`inplace_loss=False`): the step before those two
  optimisations, timed in the same interleaved group so old/new is a same-run ratio.
* **plain HF**: `AutoModelForCausalLM.from_config(config)` (default attention, fp32), `torch.optim.AdamW(params, lr)`,
  `model(input_ids=..., labels=...)`, `loss.backward()`, `optimizer.step()`, `optimizer.zero_grad()`. Its bf16
  variant wraps the forward in `torch.autocast("cpu", dtype=torch.bfloat16)` as the docs do.

Where bf16 is not native (no AVX512-BF16/AMX: PyTorch emulates bf16 matmuls ~15-70x slower than fp32), the bf16
pair runs with a reduced batch (one row) so the suite stays short; those rows say so and are not comparable with
the fp32 rows, only with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchResult, Timing, interleaved, register

VOCAB = 8192
DOC_LEN = (32, 512)  # uniform document lengths: ~1.9 documents per 256-token row, ~4.5 per 1024-token row
TARGET_DEFAULTS = 1.5  # midtrain defaults / plain defaults
TARGET_EQUAL = 1.15  # midtrain / plain at equal precision (fp32)


# --------------------------------------------------------------------------- data


def make_source(n_tokens: int, seed: int = 0):
    """An in-memory `TokenizedSource` of random documents (uniform lengths in DOC_LEN, random ids)."""
    from midtrain.data import TokenizedSource
    from midtrain.data.sources import SkipReport

    rng = np.random.default_rng(seed)
    lens = rng.integers(DOC_LEN[0], DOC_LEN[1] + 1, size=n_tokens // DOC_LEN[0] + 1)
    lens = lens[: int(np.searchsorted(np.cumsum(lens), n_tokens)) + 1]
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = rng.integers(0, VOCAB, size=int(offsets[-1]), dtype=np.uint16)
    return TokenizedSource(
        name="bench",
        fingerprint="bench",
        directory=Path("."),
        tokens=tokens,
        offsets=offsets,
        holdout_tokens=np.zeros(0, dtype=np.uint16),
        holdout_offsets=np.zeros(1, dtype=np.int64),
        skips=SkipReport(),
        meta={},
    )


def make_loader(source, seq_len: int, batch_tokens: int, seed: int = 0):
    from midtrain.data import PackedLoader

    return PackedLoader([source], [1.0], seq_len=seq_len, global_batch_seqs=batch_tokens // seq_len, seed=seed)


def make_stage(seq_len: int, batch_tokens: int, steps: int = 1000):
    """A one-stage plan through the real recipe schema and `build_plan` (cosine, short warm-up)."""
    from midtrain.config import Recipe
    from midtrain.plan import build_plan

    recipe = Recipe.model_validate(
        {
            "base": "preset:small-llama",
            "tokenizer": "bytes",
            "sources": [{"name": "bench", "path": "bench.jsonl"}],
            "stages": [
                {
                    "name": "bench",
                    "tokens": steps * batch_tokens,
                    "seq_len": seq_len,
                    "batch": {"tokens": batch_tokens},
                    "schedule": {"kind": "cosine", "peak_lr": 1e-3, "min_lr": 1e-4, "warmup_tokens": batch_tokens},
                    "data": {"mixture": {"bench": 1.0}},
                }
            ],
        }
    )
    return recipe, build_plan(recipe).stages[0]


# --------------------------------------------------------------------------- the two loops


def midtrain_step(
    preset: str, seq_len: int, batch_tokens: int, precision: str, source, reference: bool = False
) -> Callable[[], dict]:
    """One `Trainer.train_step()` of midtrain's real trainer, exactly as `midtrain run` builds it (no callbacks).
    `reference`: dense-mask attention and F.cross_entropy instead (the pre-optimisation step, same results)."""
    import functools

    from midtrain.model import build_model, forward_packed, preset_config
    from midtrain.train.distributed import DistInfo
    from midtrain.train.optim import build_optimizer
    from midtrain.train.trainer import Trainer

    recipe, stage = make_stage(seq_len, batch_tokens)
    stage_cfg = recipe.stages[0]
    model = build_model(preset_config(preset, vocab_size=VOCAB), seed=0)
    model.train()
    optimizer = build_optimizer(model, stage_cfg.optimizer, lr=stage.lr_at_step(0))
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        loader=make_loader(source, seq_len, batch_tokens),
        stage=stage,
        forward=functools.partial(forward_packed, segments=False) if reference else forward_packed,
        dist=DistInfo(),
        domains=["bench"],
        precision=precision,
        grad_clip=stage_cfg.optimizer.grad_clip,
        callbacks=[],
        inplace_loss=not reference,
    )
    return trainer.train_step


def plain_step(preset: str, seq_len: int, batch_tokens: int, bf16: bool, source) -> Callable[[], float]:
    """The transformers-docs training loop for a causal LM; nothing tuned, nothing detuned."""
    from transformers import AutoModelForCausalLM

    from midtrain.model import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset, vocab_size=VOCAB))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(source, seq_len, batch_tokens)  # same seed: the same token ids as midtrain's side

    def step() -> float:
        (batch,) = loader.next_step()
        input_ids = batch["input_ids"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = model(input_ids=input_ids, labels=input_ids)
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach().item()

    return step


# --------------------------------------------------------------------------- the benchmark


def _row(preset, seq_len, batch_tokens, loop, precision, role, timing: Timing) -> dict:
    return {
        "model": preset,
        "seq_len": seq_len,
        "batch_tokens": batch_tokens,
        "loop": loop,
        "precision": precision,
        "role": role,
        "steps": len(timing.times),
        "step_s": timing.median,
        "cpu_s": timing.cpu_median,
        "tokens_per_s": batch_tokens / timing.median,
        "spread": timing.spread(),
        "peak_rss_mb": timing.peak_rss_mb,
        "step_rss_mb": timing.step_rss_mb,
        "step_times_s": [round(t, 4) for t in timing.times],
        "warmup_s": [round(t, 4) for t in timing.warmup],
    }


def run_group(preset, seq_len, batch_tokens, specs, source, warmup, repeats, log) -> dict[str, Timing]:
    """specs: name -> ("midtrain" | "midtrain-ref" | "plain", precision); timed interleaved, then freed."""
    steps = {}
    for name, (loop, precision) in specs.items():
        if loop in ("midtrain", "midtrain-ref"):
            steps[name] = midtrain_step(preset, seq_len, batch_tokens, precision, source, loop == "midtrain-ref")
        else:
            steps[name] = plain_step(preset, seq_len, batch_tokens, precision == "bf16-mixed", source)
    log(f"{preset} seq {seq_len}, {batch_tokens} tokens/step: {', '.join(specs)} (warm-up {warmup}, {repeats} steps)")
    return interleaved(steps, warmup=warmup, repeats=repeats, log=log)


@register("trainer", "midtrain Trainer vs the plain HF training loop (tokens/s, peak RSS)")
def bench_trainer(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.train.precision import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    bf16_native = native_bf16(cpu)
    presets = ["tiny-llama"] if quick else ["small-llama"]
    seq_lens = [256] if quick else [256, 1024]
    batch_tokens = 4096 if quick else 8192
    warmup, n = 1, repeats or (3 if quick else 5)
    # Emulated bf16 is far too slow for full batches in a short suite: one row, seq 256 only, two steps.
    bf16_tokens, bf16_seq_lens, bf16_n = (
        (batch_tokens, seq_lens, n) if bf16_native else (256, [256], repeats or 2)
    )
    source = make_source(4_000_000)

    rows, summary = [], []
    for preset in presets:
        for seq_len in seq_lens:
            specs = {"midtrain fp32": ("midtrain", "fp32"), "midtrain ref fp32": ("midtrain-ref", "fp32"),
                     "plain fp32": ("plain", "fp32")}
            if auto != "fp32":  # on bf16-native hardware the default is its own configuration
                specs = {"midtrain auto": ("midtrain", auto), **specs}
            t = run_group(preset, seq_len, batch_tokens, specs, source, warmup, n, log)
            m_auto = t["midtrain auto"] if auto != "fp32" else t["midtrain fp32"]
            rows.append(_row(preset, seq_len, batch_tokens, "midtrain", f"auto->{auto}", "defaults", m_auto))
            if auto != "fp32":
                rows.append(_row(preset, seq_len, batch_tokens, "midtrain", "fp32", "equal", t["midtrain fp32"]))
            rows.append(_row(preset, seq_len, batch_tokens, "midtrain reference path", "fp32", "reference",
                             t["midtrain ref fp32"]))
            rows.append(_row(preset, seq_len, batch_tokens, "plain HF", "fp32", "defaults", t["plain fp32"]))
            plain_tps = batch_tokens / t["plain fp32"].median
            summary.append({
                "model": preset, "seq_len": seq_len, "comparison": "midtrain defaults / plain defaults",
                "precision": f"{auto} vs fp32", "ratio": batch_tokens / m_auto.median / plain_tps,
                "target": TARGET_DEFAULTS,
            })
            summary.append({
                "model": preset, "seq_len": seq_len, "comparison": "midtrain / plain, equal precision",
                "precision": "fp32", "ratio": batch_tokens / t["midtrain fp32"].median / plain_tps,
                "target": TARGET_EQUAL,
            })
            summary.append({
                "model": preset, "seq_len": seq_len, "comparison": "midtrain reference path / plain",
                "precision": "fp32", "ratio": batch_tokens / t["midtrain ref fp32"].median / plain_tps,
                "target": None,
            })
            summary.append({
                "model": preset, "seq_len": seq_len, "comparison": "midtrain / midtrain reference path",
                "precision": "fp32", "ratio": t["midtrain ref fp32"].median / t["midtrain fp32"].median,
                "target": None,
            })
        for seq_len in bf16_seq_lens:
            specs = {"midtrain bf16": ("midtrain", "bf16-mixed"), "plain bf16": ("plain", "bf16-mixed")}
            t = run_group(preset, seq_len, bf16_tokens, specs, source, warmup, bf16_n, log)
            note = "" if bf16_native else " (emulated bf16, 1-row batch)"
            pairs = (("midtrain", "bf16-mixed", "midtrain bf16"), ("plain HF", "bf16 autocast", "plain bf16"))
            for loop, label, key in pairs:
                rows.append(_row(preset, seq_len, bf16_tokens, loop, label + note, "equal", t[key]))
            summary.append({
                "model": preset, "seq_len": seq_len, "comparison": "midtrain / plain, equal precision",
                "precision": "bf16" + note,
                "ratio": t["plain bf16"].median / t["midtrain bf16"].median,
                "target": TARGET_EQUAL if bf16_native else None,
            })
    for s in summary:
        s["meets_target"] = None if s["target"] is None else bool(s["ratio"] >= s["target"])

    notes = [
        f"precision auto resolves to {auto} on this CPU (native bf16: {bf16_native})",
        f"{warmup} warm-up step(s), then median of {n} interleaved steps per configuration "
        f"(bf16 pair: {bf16_n}); tokens/s = batch tokens / median step time",
        "peak_rss_mb: process high-water mark during each configuration's first (warm-up) step, heap trimmed before "
        "it (includes the interpreter and every model of the interleaved group); step_rss_mb: that peak minus RSS at "
        "the step's start (the step's activations, logits, gradients and first-step optimizer state)",
        "plain HF computes loss over every position (labels = input_ids); midtrain masks document starts, "
        "confines attention to documents, clips gradients and keeps per-source loss sums",
        "midtrain reference path: the same trainer with the dense 4D document mask and F.cross_entropy (the step "
        "before per-document attention and the in-place cross-entropy; losses equal to 1e-5)",
    ]
    return BenchResult(
        name="trainer",
        columns=["model", "seq_len", "batch_tokens", "loop", "precision", "role", "step_s", "cpu_s", "tokens_per_s",
                 "spread", "peak_rss_mb", "step_rss_mb"],
        rows=rows,
        summary=summary,
        notes=notes,
        extra={"quick": quick, "warmup": warmup, "repeats": n, "doc_len_uniform": list(DOC_LEN)},
    )
