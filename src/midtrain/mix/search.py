"""`midtrain mix search`: RegMix-style mixture optimisation for one stage of a recipe.

1. Sample N mixtures from Dirichlet(c * w) around the stage's effective weights w (replay folded in), one seeded
   draw after another (a larger N keeps the first N).
2. Train a proxy per mixture (`proxy.py`: the stage at a short budget, its own run dir, resumable).
3. Fit a regression from weights to the target metric; report the held-out Spearman rank correlation (k-fold or a
   held-out fraction): it says whether the proxies' ranking is predictable at all.
4. Score many candidates drawn like the proxies, average the best `top_k`: the predicted best mixture, written as a
   recipe snippet (`best_mixture.yaml`) beside `summary.json`.
5. `verify`: train the predicted, the recipe's and the uniform mixture at the proxies' budget (per seed) and
   measure the target: does the prediction actually win?

Directory: OUT/search.json (settings), OUT/proxies/<i>/{recipe.yaml, log.txt, run/, result.json},
OUT/verify/<mixture>-seed<s>/..., OUT/summary.json, OUT/best_mixture.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from midtrain.config import Recipe
from midtrain.eval.gates import metric_problem
from midtrain.eval.keys import DOMAIN_TASKS, MetricKey
from midtrain.io import write_json_atomic, write_text_atomic
from midtrain.layout import ProxyLayout
from midtrain.mix.proxy import (
    MixError,
    MixRunError,
    Proxy,
    derive_recipe,
    higher_is_better,
    metric_of,
    run_proxies,
    stage_index,
    stage_start,
)
from midtrain.mix.regress import MODELS, auto_model, best_mixture, cross_validate, fit, sample_mixtures
from midtrain.plan import build_plan

# Settings that change what the proxies train: a search directory records them, and a re-run must agree.
PROXY_KEYS = ("stage", "tokens", "concentration", "seed", "start")


@dataclass(frozen=True)
class SearchConfig:
    stage: str
    target: str
    proxies: int
    tokens: int | None = None  # proxy budget; None = the stage's own tokens
    concentration: float = 5.0  # Dirichlet c: weight std ~ sqrt(w(1-w)/(c+1)); w = 1/3, c = 5 -> 0.19
    seed: int = 0  # mixture sampling (the proxies train with the recipe's seed)
    start: str | None = None  # what proxies start from; None = the stage's own start
    model: str = "auto"  # auto: quadratic with enough proxies (regress.auto_model), else linear
    folds: int = 5
    heldout: float | None = None  # one split holding out this fraction instead of k-fold
    candidates: int = 100_000
    top_k: int = 100
    verify_seeds: tuple[int, ...] = ()  # train best/recipe/uniform at these seeds to check the prediction
    workers: int = 1
    threads: int | None = None
    keep_models: bool = False

    def __post_init__(self) -> None:
        if self.proxies < 3:
            raise MixError(f"--proxies {self.proxies}: need at least 3 proxies to fit and hold some out")
        if self.model not in (*MODELS, "auto"):
            raise MixError(f"--model {self.model!r}: choose auto or one of {', '.join(MODELS)}")
        if not self.concentration > 0:
            raise MixError(f"--concentration {self.concentration}: must be > 0")
        if self.heldout is not None and not 0 < self.heldout < 1:
            raise MixError(f"--heldout {self.heldout}: a fraction in (0, 1)")
        if self.workers < 1:
            raise MixError(f"--workers {self.workers}: must be >= 1")


def eval_tasks_for(target: str, stage_tasks: Sequence[str]) -> list[str]:
    """Proxies evaluate only what the target needs: the held-out loss, or the stage's own task list."""
    key = MetricKey.try_parse(target)  # a malformed target is reported by check_target's metric_problem
    held_out_loss = key is not None and key.task in DOMAIN_TASKS and key.length is None
    return ["loss"] if held_out_loss else list(stage_tasks)


def check_target(recipe: Recipe, index: int, target: str) -> None:
    stage = recipe.stages[index]
    tasks = eval_tasks_for(target, stage.eval.tasks)
    why = metric_problem(target, tasks, stage.eval.lengths, [s.domain_name for s in recipe.sources])
    if why:
        raise MixError(f"--target {target}: {why}")


def proxy_tokens(recipe: Recipe, index: int, tokens: int | None) -> int:
    stage = recipe.stages[index]
    tokens = stage.tokens if tokens is None else int(tokens)
    if tokens < stage.batch.tokens:
        raise MixError(f"--tokens {tokens}: less than one batch of stage {stage.name!r} ({stage.batch.tokens})")
    return tokens


def check_settings(out: Path, settings: dict[str, Any], name: str = "search.json") -> None:
    """Records what a directory's proxies train (`out/name`); refuses to resume one with other settings."""
    path = out / name
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise MixRunError(f"{out} holds a search with other settings ({lines}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def snippet(stage: str, weights: dict[str, float], note: str, replay: bool) -> str:
    """A recipe fragment to paste under the stage (and the equivalent --set)."""
    mixture = {k: round(v, 4) for k, v in weights.items()}
    body: dict[str, Any] = {"mixture": mixture}
    if replay:
        body["replay"] = None  # the searched weights already include the replayed share
    flow = yaml.safe_dump(mixture, default_flow_style=True, sort_keys=False).strip()
    lines = [f"# {line}" for line in note.splitlines()]
    lines += [f"# paste as stages.{stage}.data, or: --set 'stages.{stage}.data.mixture={flow}'"
              + (f" --set stages.{stage}.data.replay=null" if replay else "")]
    return "\n".join(lines) + "\n" + yaml.safe_dump({"data": body}, sort_keys=False)


def method_setup(recipe: Recipe, recipe_file: Path, cfg: Any, keys: Sequence[str]
                 ) -> tuple[int, int, str, dict[str, float], dict[str, Any]]:
    """What every mixture method checks and settles first, from `cfg` (stage, target, tokens, start): the stage's
    index, the proxies' budget and start, the stage's effective mixture, and the settings (`keys` of cfg and those)
    that a resumed directory must agree on."""
    index = stage_index(recipe, cfg.stage, recipe_file)
    check_target(recipe, index, cfg.target)
    tokens = proxy_tokens(recipe, index, cfg.tokens)
    start = stage_start(recipe, index, cfg.start)
    center = build_plan(recipe).stages[index].mixture
    names = list(center)
    if len(names) < 2:
        raise MixError(f"stage {cfg.stage!r} mixes one source ({names[0]}): there is no mixture to optimise")
    settings = {"recipe": str(Path(recipe_file).resolve()), **{k: getattr(cfg, k) for k in keys},
                "tokens": tokens, "start": start, "sources": names, "center": [center[n] for n in names]}
    return index, tokens, start, center, settings


def run_search(recipe: Recipe, recipe_file: Path, cfg: SearchConfig, out: Path,
               on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """The whole search; returns (and writes) the summary. `on_event(kind, info)` reports progress:
    ("start", {total, done}), ("proxy", {proxy, result}), ("verify", {total})."""
    index, tokens, start, center, settings = method_setup(recipe, recipe_file, cfg, PROXY_KEYS)
    names = list(center)
    check_settings(out, settings)
    tasks = eval_tasks_for(cfg.target, recipe.stages[index].eval.tasks)
    weights = sample_mixtures(np.array([center[n] for n in names]), cfg.concentration, cfg.proxies, cfg.seed)

    def proxy(directory: Path, w: Sequence[float], seed: int | None = None) -> Proxy:
        mixture = {n: round(float(x), 6) for n, x in zip(names, w)}
        data = derive_recipe(recipe, index, mixture=mixture, tokens=tokens, run_dir=ProxyLayout(directory).run.root,
                             start=start, seed=seed, tasks=tasks)
        return Proxy(directory, cfg.stage, data)

    proxies = [proxy(out / "proxies" / str(i), w) for i, w in enumerate(weights)]
    emit = on_event or (lambda kind, info: None)
    emit("start", {"total": len(proxies), "done": sum(p.done for p in proxies), "phase": "proxies"})
    results = run_proxies(proxies, workers=cfg.workers, threads=cfg.threads, keep_models=cfg.keep_models,
                          on_done=lambda p, r: emit("proxy", {"proxy": p, "result": r}))
    w_used = np.array([[r["mixture"].get(n, 0.0) for n in names] for r in results])
    w_used /= w_used.sum(1, keepdims=True)
    y = np.array([metric_of(r, cfg.target, p.result_file) for p, r in zip(proxies, results)])

    maximize = higher_is_better(cfg.target)
    model = auto_model(len(y), len(names)) if cfg.model == "auto" else cfg.model
    cv = cross_validate(w_used, y, model, folds=cfg.folds, heldout=cfg.heldout, seed=cfg.seed)
    reg = fit(w_used, y, model)
    best, best_pred = best_mixture(reg, np.array([center[n] for n in names]), cfg.concentration, maximize=maximize,
                                   candidates=cfg.candidates, top_k=cfg.top_k, seed=cfg.seed + 1)
    named = {"predicted": dict(zip(names, best.tolist())), "recipe": dict(center),
             "uniform": {n: 1.0 / len(names) for n in names}}
    predicted = {k: float(reg.predict(np.array([[m[n] for n in names]]))[0]) for k, m in named.items()}
    best_proxy = int(np.argmax(y) if maximize else np.argmin(y))
    summary: dict[str, Any] = {
        "settings": {**settings, **{k: v for k, v in asdict(cfg).items() if k not in settings}},
        "target": cfg.target,
        "higher_is_better": maximize,
        "sources": names,
        "proxies": [{"index": i, "mixture": dict(zip(names, w_used[i].tolist())), "value": float(y[i]),
                     "heldout_prediction": cv.predictions[i]} for i in range(len(y))],
        "cv": {"spearman": cv.spearman, "mae": cv.mae, "n": cv.n, "scheme": cv.scheme},
        "model": {"kind": reg.model, "lambda": reg.lam},
        "best_proxy": {"index": best_proxy, "mixture": dict(zip(names, w_used[best_proxy].tolist())),
                       "value": float(y[best_proxy])},
        "mixtures": named,
        "predicted_value": predicted,
    }
    note = (f"midtrain mix search: predicted best mixture of stage {cfg.stage!r} for {cfg.target} "
            f"({'higher' if maximize else 'lower'} is better; predicted {best_pred:.4g}),\n"
            f"from {len(y)} proxies of {tokens:,} tokens; held-out Spearman {cv.spearman:.3f} ({cv.scheme})")
    return conclude(summary, "predicted", proxy, out, cfg, emit, note, recipe.stages[index].data.replay is not None)


def conclude(summary: dict[str, Any], best: str, proxy: Callable[..., Proxy], out: Path, cfg: Any,
             emit: Callable[[str, dict], None], note: str, replay: bool) -> dict[str, Any]:
    """The end of a mixture method: `summary["mixtures"]` verified at `cfg.verify_seeds` (when any), the `best`
    one written as a recipe snippet (OUT/best_mixture.yaml), the summary written (OUT/summary.json)."""
    if cfg.verify_seeds:
        summary["verify"] = verify_mixtures(summary["mixtures"], proxy, out, target=cfg.target,
                                            seeds=cfg.verify_seeds, workers=cfg.workers, threads=cfg.threads,
                                            keep_models=cfg.keep_models, emit=emit)
    write_text_atomic(out / "best_mixture.yaml", snippet(cfg.stage, summary["mixtures"][best], note, replay))
    write_json_atomic(out / "summary.json", summary)
    return summary


def verify_mixtures(named: dict[str, dict[str, float]], proxy: Callable[..., Proxy], out: Path, *, target: str,
                    seeds: Sequence[int], workers: int, threads: int | None, keep_models: bool,
                    emit: Callable[[str, dict], None]) -> dict[str, Any]:
    """Each named mixture ({label: {source: weight}}) trained per seed, as `proxy(dir, weights, seed=)` builds the run
    (its budget: the proxies' for a search, the stage's own for DoReMi), in OUT/verify/<label>-seed<s>: the measured
    target, per label."""
    names = list(named["recipe"])
    runs = [(label, seed, proxy(out / "verify" / f"{label}-seed{seed}", [mix[n] for n in names], seed=seed))
            for seed in seeds for label, mix in named.items()]
    emit("start", {"total": len(runs), "done": sum(p.done for _, _, p in runs), "phase": "verify"})
    results = run_proxies([p for _, _, p in runs], workers=workers, threads=threads, keep_models=keep_models,
                          on_done=lambda p, r: emit("proxy", {"proxy": p, "result": r}))
    values: dict[str, list[float]] = {label: [] for label in named}
    for (label, _, p), r in zip(runs, results):
        values[label].append(metric_of(r, target, p.result_file))
    return {label: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    "seeds": list(seeds)} for label, v in values.items()}
