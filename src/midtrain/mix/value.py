"""`midtrain mix value`: microanneal data valuation (Llama 3 §3.1.3, OLMo 2's microanneals).

From the stage's start checkpoint, two short anneals per seed at the same token budget, LR schedule and seed:
  control    the stage's own (effective) mixture;
  candidate  the candidate source at `fraction`, the stage's mixture scaled by (1 - fraction) for the rest.
The candidate's value is the change of each after-eval metric (candidate - control), as mean ± std over seeds.
A candidate is a source of the recipe or a new path (added to both arms as a source, so both evaluate its held-out
loss). Each anneal is a proxy run (`proxy.py`) in OUT/runs/<arm>-seed<s>-<hash of its recipe>/: an identical anneal
(e.g. the control, for a second candidate) is trained once and found again, and a stopped valuation resumes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from midtrain.config import Recipe
from midtrain.config.recipe import NAME_RE
from midtrain.io import write_json_atomic
from midtrain.layout import ProxyLayout
from midtrain.mix.proxy import MixError, Proxy, derive_recipe, higher_is_better, run_proxies, stage_index, stage_start
from midtrain.plan import build_plan


@dataclass(frozen=True)
class ValueConfig:
    stage: str
    candidate: str  # a source name of the recipe, or a path (file or directory) of documents
    fraction: float = 0.3  # Llama 3: 30% candidate, 70% the default mix
    seeds: tuple[int, ...] = (1, 2, 3)
    tokens: int | None = None  # None: a tenth of the stage's tokens (at least one batch)
    start: str | None = None  # None: the stage's start (previous stage's export, or the base)
    name: str | None = None  # source name for a path candidate (default: its file name)
    domain: str | None = None  # domain tag for a path candidate (default: its name)
    text_field: str = "text"
    workers: int = 1
    threads: int | None = None
    keep_models: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise MixError(f"--fraction {self.fraction}: must lie strictly between 0 and 1")
        if not self.seeds:
            raise MixError("--seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise MixError(f"--seeds {list(self.seeds)}: seeds repeat")


def _name_from_path(path: Path) -> str:
    stem = path.name.split(".")[0] if path.is_file() else path.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip("._-") or "candidate"
    return name


def resolve_candidate(recipe: Recipe, cfg: ValueConfig) -> tuple[str, list[dict[str, Any]]]:
    """(source name, sources to add): a recipe source as is, a path as a new source with its domain tag."""
    known = [s.name for s in recipe.sources]
    if cfg.candidate in known:
        return cfg.candidate, []
    path = Path(cfg.candidate)
    if not path.exists():
        raise MixError(f"--candidate {cfg.candidate}: neither a source of the recipe (sources: {', '.join(known)}) "
                       "nor an existing file or directory")
    name = cfg.name or _name_from_path(path)
    if not NAME_RE.match(name):
        raise MixError(f"--name {name!r}: names may use letters, digits, '_', '.', '-'")
    if name in known:
        raise MixError(f"--candidate {cfg.candidate}: the recipe already has a source named {name!r}; "
                       "pass --name to name the new one")
    return name, [{"name": name, "path": str(path.resolve()), "domain": cfg.domain or name,
                   "text_field": cfg.text_field}]


def candidate_mixture(own: dict[str, float], candidate: str, fraction: float) -> dict[str, float]:
    """`fraction` of the tokens from `candidate`, the rest from `own` (normalised) in its proportions."""
    total = sum(own.values())
    mixed = {k: (1 - fraction) * v / total for k, v in own.items()}
    mixed[candidate] = mixed.get(candidate, 0.0) + fraction
    return mixed


def default_tokens(recipe: Recipe, index: int) -> int:
    stage = recipe.stages[index]
    return max(stage.batch.tokens, stage.tokens // 10)


def _fingerprint(data: dict[str, Any]) -> str:
    blob = yaml.safe_dump({k: v for k, v in data.items() if k != "run_dir"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_value(recipe: Recipe, recipe_file: Path, cfg: ValueConfig, out: Path,
              on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Trains (or finds) the control and candidate anneals for every seed; returns and writes the summary."""
    index = stage_index(recipe, cfg.stage, recipe_file)
    name, extra = resolve_candidate(recipe, cfg)
    tokens = default_tokens(recipe, index) if cfg.tokens is None else int(cfg.tokens)
    if tokens < recipe.stages[index].batch.tokens:
        raise MixError(f"--tokens {tokens}: less than one batch of stage {cfg.stage!r} "
                       f"({recipe.stages[index].batch.tokens})")
    start = stage_start(recipe, index, cfg.start)
    own = build_plan(recipe).stages[index].mixture
    arms = {"control": dict(own), "candidate": candidate_mixture(own, name, cfg.fraction)}
    label = {"control": "control", "candidate": f"{name}-f{cfg.fraction:g}"}
    runs: list[tuple[str, int, Proxy]] = []
    for seed in cfg.seeds:
        for arm, mixture in arms.items():
            data = derive_recipe(recipe, index, mixture=mixture, tokens=tokens, run_dir=Path("."), start=start,
                                 seed=seed, extra_sources=extra)
            directory = out / "runs" / f"{label[arm]}-seed{seed}-{_fingerprint(data)}"
            data["run_dir"] = str(ProxyLayout(directory).run.root.resolve())
            runs.append((arm, seed, Proxy(directory, cfg.stage, data)))
    emit = on_event or (lambda kind, info: None)
    emit("start", {"total": len(runs), "done": sum(p.done for *_, p in runs), "phase": "anneals"})
    results = run_proxies([p for *_, p in runs], workers=cfg.workers, threads=cfg.threads,
                          keep_models=cfg.keep_models, on_done=lambda p, r: emit("proxy", {"proxy": p, "result": r}))
    per_seed: dict[int, dict[str, dict[str, float]]] = {s: {} for s in cfg.seeds}
    for (arm, seed, _), result in zip(runs, results):
        per_seed[seed][arm] = result["metrics"]
    common = sorted(set.intersection(*(set(m) for s in per_seed.values() for m in s.values())))
    deltas = {}
    for metric in common:
        control = [per_seed[s]["control"][metric] for s in cfg.seeds]
        treated = [per_seed[s]["candidate"][metric] for s in cfg.seeds]
        diff = [t - c for t, c in zip(treated, control)]
        (c_mean, c_std), (t_mean, t_std), (d_mean, d_std) = mean_std(control), mean_std(treated), mean_std(diff)
        deltas[metric] = {"control": c_mean, "control_std": c_std, "candidate": t_mean, "candidate_std": t_std,
                          "delta": d_mean, "delta_std": d_std, "deltas": diff,
                          "higher_is_better": higher_is_better(metric)}
    summary = {
        "settings": {"recipe": str(Path(recipe_file).resolve()), **asdict(cfg), "seeds": list(cfg.seeds),
                     "tokens": tokens, "start": start},
        "candidate": {"name": name, "new_source": bool(extra), "domain": extra[0]["domain"] if extra else
                      next(s.domain_name for s in recipe.sources if s.name == name)},
        "mixtures": arms,
        "runs": [{"arm": arm, "seed": seed, "dir": str(p.dir)} for arm, seed, p in runs],
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "deltas": deltas,
    }
    write_json_atomic(out / f"{label['candidate']}.json", summary)
    return summary
