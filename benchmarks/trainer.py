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

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchResult, Timing, interleaved, register

VOCAB = 8192
DOC_LEN = (32, 512)  # uniform document lengths: ~1.9 documents per 256-token row, ~4.5 per 1024-token row
TARGET_DEFAULTS = 1.5  # midtrain defaults / plain defaults
TARGET_EQUAL = 1.15  # midtrain / plain at equal precision (fp32)
TARGET_MFU = 0.50  # of the measured matmul peak, at hidden >= 512
# (preset, seq_lens, with the reference path, measured steps): hidden 256 (4 layers) and 512 (8 layers, ~5x the
# FLOPs per token, so fewer steps and no reference path). 8192 tokens per optimizer step throughout.
FULL_CONFIGS = (
    ("small-llama", (256, 1024, 4096), True, None),
    ("medium-llama", (256, 1024, 4096), False, 3),
)
QUICK_CONFIGS = (("tiny-llama", (256,), True, None),)


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
    preset: str, seq_len: int, batch_tokens: int, precision: str, source, reference: bool = False,
    compiled: bool = False, checkpointing: bool = False, loss_chunk_tokens: int | None = None, vocab: int = VOCAB,
    loader=None, config=None, forward=None,
) -> Callable[[], dict]:
    """One `Trainer.train_step()` of midtrain's real trainer, exactly as `midtrain run` builds it (no callbacks).
    `reference`: dense-mask attention and F.cross_entropy instead (the pre-optimisation step, same results).
    `compiled`: the model wrapped in `torch.compile` after the optimizer is built, as recipe `compile: true` does.
    `checkpointing`, `loss_chunk_tokens`: the recipe keys `activation_checkpointing` and `loss_chunk_tokens`.
    `loader`: another batch source (anything with `next_step()`) instead of the packed loader over `source`.
    `config`: a model config instead of `preset`'s; `forward`: another forward than `forward_packed`."""

    from midtrain.model import build_model, forward_packed, preset_config
    from midtrain.train.distributed import DistInfo
    from midtrain.train.optim import build_optimizer
    from midtrain.train.trainer import Trainer

    recipe, stage = make_stage(seq_len, batch_tokens)
    stage_cfg = recipe.stages[0]
    model = build_model(config if config is not None else preset_config(preset, vocab_size=vocab), seed=0)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, stage_cfg.optimizer, lr=stage.lr_at_step(0))
    if forward is None:
        forward = functools.partial(forward_packed, segments=False) if reference else forward_packed
    if loss_chunk_tokens is not None:
        forward = functools.partial(forward, loss_chunk_tokens=loss_chunk_tokens)
    if compiled:
        model = torch.compile(model)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        loader=loader if loader is not None else make_loader(source, seq_len, batch_tokens),
        stage=stage,
        forward=forward,
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


def _row(preset, seq_len, batch_tokens, loop, precision, role, timing: Timing, flops_per_token: int,
         peak: float) -> dict:
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
        "mfu": None if peak is None else flops_per_token * batch_tokens / timing.median / peak,
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


@functools.cache  # one meta-device model per (preset, seq_len), not one per table row
def _flops_per_token(preset: str, seq_len: int) -> int:
    from midtrain.model import preset_config
    from midtrain.train.flops import training_flops_per_token

    with torch.device("meta"):  # the count needs the modules' shapes only
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(preset_config(preset, vocab_size=VOCAB))
    return training_flops_per_token(model, seq_len)


def _peaks(bf16_native: bool, log) -> dict[str, float]:
    """Matmul FLOP/s this process gets now, fp32 and bf16 (emulated bf16 is ~100x slower: a small matmul)."""
    from midtrain.train.flops import measure_matmul_peak

    peaks = {"fp32": measure_matmul_peak(torch.float32, size=1024, seconds=1.0),
             "bf16": measure_matmul_peak(torch.bfloat16, size=1024 if bf16_native else 256, seconds=1.0)}
    log(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    return peaks


@register("trainer", "midtrain Trainer vs the plain HF training loop (tokens/s, MFU, peak RSS)")
def bench_trainer(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    from midtrain.model import preset_config
    from midtrain.train.precision import native_bf16, resolve_precision

    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    bf16_native = native_bf16(cpu)
    configs = QUICK_CONFIGS if quick else FULL_CONFIGS
    batch_tokens = 4096 if quick else 8192
    warmup, n_default = 1, repeats or (3 if quick else 5)
    # Emulated bf16 is far too slow for full batches in a short suite: one row, seq 256 only, two steps.
    bf16_tokens, bf16_n = (batch_tokens, n_default) if bf16_native else (256, repeats or 2)
    source = make_source(4_000_000)
    # The peak is measured before and after the steps (load changes): MFU uses the higher, the conservative choice.
    peaks_before = _peaks(bf16_native, log)

    timed: list[tuple] = []  # (preset, seq_len, batch_tokens, loop, precision label, role, Timing, precision)
    summary = []
    for preset, seq_lens, with_reference, n_steps in configs:
        n = repeats or n_steps or n_default
        for seq_len in seq_lens:
            specs = {"midtrain fp32": ("midtrain", "fp32"), "plain fp32": ("plain", "fp32")}
            if with_reference:
                specs = {"midtrain fp32": ("midtrain", "fp32"), "midtrain ref fp32": ("midtrain-ref", "fp32"),
                         "plain fp32": ("plain", "fp32")}
            if auto != "fp32":  # on bf16-native hardware the default is its own configuration
                specs = {"midtrain auto": ("midtrain", auto), **specs}
            t = run_group(preset, seq_len, batch_tokens, specs, source, warmup, n, log)
            m_auto = t["midtrain auto"] if auto != "fp32" else t["midtrain fp32"]
            key = (preset, seq_len, batch_tokens)
            timed.append((*key, "midtrain", f"auto->{auto}", "defaults", m_auto, auto))
            if auto != "fp32":
                timed.append((*key, "midtrain", "fp32", "equal", t["midtrain fp32"], "fp32"))
            if with_reference:
                timed.append((*key, "midtrain reference path", "fp32", "reference", t["midtrain ref fp32"], "fp32"))
            timed.append((*key, "plain HF", "fp32", "defaults", t["plain fp32"], "fp32"))
            plain = t["plain fp32"].median
            summary.append({"model": preset, "seq_len": seq_len, "comparison": "midtrain defaults / plain defaults",
                            "precision": f"{auto} vs fp32", "ratio": plain / m_auto.median,
                            "target": TARGET_DEFAULTS})
            summary.append({"model": preset, "seq_len": seq_len, "comparison": "midtrain / plain, equal precision",
                            "precision": "fp32", "ratio": plain / t["midtrain fp32"].median, "target": TARGET_EQUAL})
            if with_reference:
                ref = t["midtrain ref fp32"].median
                summary.append({"model": preset, "seq_len": seq_len, "comparison": "midtrain reference path / plain",
                                "precision": "fp32", "ratio": plain / ref, "target": None})
                summary.append({"model": preset, "seq_len": seq_len,
                                "comparison": "midtrain / midtrain reference path", "precision": "fp32",
                                "ratio": ref / t["midtrain fp32"].median, "target": None})
    bf16_preset, bf16_seq = configs[0][0], configs[0][1][0]
    specs = {"midtrain bf16": ("midtrain", "bf16-mixed"), "plain bf16": ("plain", "bf16-mixed")}
    t = run_group(bf16_preset, bf16_seq, bf16_tokens, specs, source, warmup, bf16_n, log)
    note = "" if bf16_native else " (emulated bf16, 1-row batch)"
    for loop, label, name in (("midtrain", "bf16-mixed", "midtrain bf16"), ("plain HF", "bf16 autocast", "plain bf16")):
        timed.append((bf16_preset, bf16_seq, bf16_tokens, loop, label + note, "equal", t[name], "bf16-mixed"))
    summary.append({"model": bf16_preset, "seq_len": bf16_seq, "comparison": "midtrain / plain, equal precision",
                    "precision": "bf16" + note, "ratio": t["plain bf16"].median / t["midtrain bf16"].median,
                    "target": TARGET_EQUAL if bf16_native else None})

    peaks_after = _peaks(bf16_native, log)
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    rows = []
    for preset, seq_len, tokens, loop, label, role, timing, precision in timed:
        # Emulated bf16 autocast mixes fp32 and bf16 kernels whose speeds differ 100x: no peak describes it.
        peak = (peaks["bf16"] if bf16_native else None) if precision == "bf16-mixed" else peaks["fp32"]
        rows.append(_row(preset, seq_len, tokens, loop, label, role, timing, _flops_per_token(preset, seq_len), peak))
    for row in rows:  # MFU of the defaults at hidden >= 512: the target
        hidden = preset_config(row["model"], vocab_size=VOCAB).hidden_size
        if row["role"] == "defaults" and row["loop"] == "midtrain" and hidden >= 512:
            summary.append({"model": row["model"], "seq_len": row["seq_len"],
                            "comparison": "midtrain defaults MFU (of the measured matmul peak)",
                            "precision": row["precision"], "ratio": row["mfu"], "target": TARGET_MFU})
    for s in summary:
        s["meets_target"] = None if s["target"] is None else bool(s["ratio"] >= s["target"])

    n_steps = ", ".join(f"{p}: {repeats or k or n_default}" for p, _, _, k in configs)
    notes = [
        f"precision auto resolves to {auto} on this CPU (native bf16: {bf16_native})",
        f"{warmup} warm-up step(s), then median of N interleaved steps per configuration ({n_steps}; "
        f"bf16 pair: {bf16_n}); tokens/s = batch tokens / median step time",
        "mfu = training FLOPs per token (midtrain.train.flops: 6 x every nn.Linear weight incl. the head, plus causal "
        "attention 6 x layers x seq x heads*head_dim) x tokens/s / the measured matmul peak of the row's compute "
        f"precision (square 1024^3 matmul, best of 1 s, before and after the steps; the higher is used): fp32 "
        f"{peaks['fp32'] / 1e9:.1f} GFLOP/s (before {peaks_before['fp32'] / 1e9:.1f}, after "
        f"{peaks_after['fp32'] / 1e9:.1f}), bf16 {peaks['bf16'] / 1e9:.2f} GFLOP/s"
        + ("" if bf16_native else " (emulated: 256^3; the emulated-bf16 rows get no MFU)"),
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
                 "mfu", "spread", "peak_rss_mb", "step_rss_mb"],
        rows=rows,
        summary=summary,
        notes=notes,
        extra={"quick": quick, "warmup": warmup, "repeats": n_default, "doc_len_uniform": list(DOC_LEN),
               "matmul_peak_flops": {"before": peaks_before, "after": peaks_after, "used": peaks}},
    )
