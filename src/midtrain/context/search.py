"""LongRoPE factor search: evolve per-dimension long factors λ_j that minimise perplexity at a target length.

Following microsoft/LongRoPE (REFERENCE §4): the population starts from the YaRN ramp (λ_j = 1 for dimensions kept
as pre-trained, s for fully interpolated ones, a blend between), candidates stay **non-decreasing in j** and on a
0.01 grid in [1, s], each generation keeps the best half as parents and fills the rest with mutations and crossovers,
and a candidate's fitness is the loss at the target length on held-out long documents. One loaded model serves
every candidate: `apply_rope` rebuilds only the rotary modules.

The search is resumable: after each generation `state.json` (population, every fitness measured, history) is written
atomically, and each generation draws from its own RNG seeded by (seed, generation), so a search stopped after
generation g and re-run continues exactly as an uninterrupted one would. The best factors so far are always in
`rope.yaml` (a recipe `rope:` block) and `history.json` (fitness per generation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midtrain.context.apply import apply_rope
from midtrain.context.methods import RotarySpec, base_spec
from midtrain.context.rope import longrope_initial_factors
from midtrain.context.setting import RopeSetting, parse_rope
from midtrain.eval.perplexity import perplexity_at_length
from midtrain.io import write_json_atomic, write_text_atomic

STATE_VERSION = 1
Factors = list[float]


class SearchError(Exception):
    """The search cannot proceed (data too short, a state file from a different search, ...)."""


@dataclass(frozen=True)
class SearchConfig:
    """What one search is; `generations` may grow between runs (re-running extends the search)."""

    target_length: int
    original: int  # L0
    population: int = 16
    generations: int = 8
    seed: int = 0
    beta_fast: float | None = None  # YaRN-ramp start; None: min(32, max(2, L0/32)) (REFERENCE §10)
    beta_slow: float = 1.0
    grid: float = 0.01
    mutation_rate: float = 0.3  # expected fraction of dimensions one mutation touches
    sigma: float = 0.25  # mutation step, as a fraction of (s - 1)
    max_windows: int = 8
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.original < 2:
            raise ValueError(f"original (L0) must be >= 2 (got {self.original})")
        if self.target_length <= self.original:
            raise ValueError(f"target_length ({self.target_length}) must exceed original L0 ({self.original})")
        if self.population < 4:
            raise ValueError(f"population must be >= 4 (got {self.population})")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0 (got {self.generations})")
        if self.max_windows < 1 or self.batch_size < 1:
            raise ValueError("max_windows and batch_size must be >= 1")
        if not 0 < self.beta_slow < self.ramp_beta_fast:
            raise ValueError(f"beta_fast ({self.ramp_beta_fast}) must exceed beta_slow ({self.beta_slow}) > 0")

    @property
    def factor(self) -> float:
        return self.target_length / self.original

    @property
    def parents(self) -> int:
        return self.population // 2

    @property
    def ramp_beta_fast(self) -> float:
        return self.beta_fast if self.beta_fast is not None else min(32.0, max(2.0, self.original / 32))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed search must share with the state it continues."""
        out = asdict(self)
        out.pop("generations")
        out["beta_fast"] = self.ramp_beta_fast
        return out


# ------------------------------------------------------------------------------------ candidates and operators
def is_monotone(factors: Sequence[float]) -> bool:
    return all(a <= b for a, b in zip(factors, factors[1:]))


def initial_factors(spec: RotarySpec, cfg: SearchConfig) -> Factors:
    """The YaRN ramp as λ, clamped into [1, s] and made exactly non-decreasing (float noise at the ends)."""
    raw = longrope_initial_factors(spec, cfg.factor, beta_fast=cfg.ramp_beta_fast, beta_slow=cfg.beta_slow)
    clamped = np.clip(np.asarray(raw, dtype=np.float64), 1.0, cfg.factor)
    return [float(x) for x in np.maximum.accumulate(clamped)]


def _snap(value: float, lo: float, hi: float, grid: float) -> float:
    # Round to the grid 1 + k·grid, then clamp to the neighbours: rounding and clamping are monotone maps.
    return float(min(max(round(1.0 + round((value - 1.0) / grid) * grid, 10), lo), hi))


def mutate(factors: Sequence[float], rng: np.random.Generator, cfg: SearchConfig) -> Factors:
    """Perturb a random subset of dimensions; each new λ_j stays between its neighbours, so order is kept."""
    out = list(factors)
    n, s = len(out), cfg.factor
    chosen = np.flatnonzero(rng.random(n) < cfg.mutation_rate)
    if len(chosen) == 0:
        chosen = rng.integers(0, n, size=1)
    for j in rng.permutation(chosen):
        lo = out[j - 1] if j > 0 else 1.0
        hi = out[j + 1] if j < n - 1 else s
        step = rng.normal(0.0, cfg.sigma * (s - 1.0))
        out[j] = _snap(out[j] + step, lo, hi, cfg.grid)
    return out


def crossover(a: Sequence[float], b: Sequence[float], rng: np.random.Generator, cfg: SearchConfig) -> Factors:
    """Two-point crossover (b's segment [i, k) inside a) at cut points that keep the order; else the mean.

    A cut is valid when a[i-1] <= b[i] and b[k-1] <= a[k]; the elementwise mean of two non-decreasing
    sequences is non-decreasing, and snapping it to the grid keeps that.
    """
    n = len(a)
    for _ in range(16):
        i, k = sorted(int(x) for x in rng.choice(n + 1, size=2, replace=False))
        if (i == 0 or a[i - 1] <= b[i]) and (k == n or b[k - 1] <= a[k]):
            return [*a[:i], *b[i:k], *a[k:]]
    return [_snap((x + y) / 2, 1.0, cfg.factor, cfg.grid) for x, y in zip(a, b)]


def _key(factors: Sequence[float]) -> str:
    return ",".join(repr(float(x)) for x in factors)


# ------------------------------------------------------------------------------------------------- fitness
def longrope_setting(factors: Sequence[float], cfg: SearchConfig) -> RopeSetting:
    """The rope setting of a candidate (short factors 1: inputs up to L0 keep their frequencies), parsed like a
    recipe's; its mapping is the recipe form (`rope.yaml` writes the same keys)."""
    setting = parse_rope({
        "method": "longrope",
        "original_max_position_embeddings": cfg.original,
        "factor": cfg.factor,
        "short_factor": [1.0] * len(factors),
        "long_factor": [float(x) for x in factors],
    })
    assert setting is not None
    return setting


def fitness(model: torch.nn.Module, documents: Sequence[np.ndarray], factors: Sequence[float],
            cfg: SearchConfig) -> float:
    """Mean loss per token at the target length with `factors` as long factors (lower is better)."""
    apply_rope(model, longrope_setting(factors, cfg))
    out = perplexity_at_length(model, documents, cfg.target_length, max_windows=cfg.max_windows,
                               batch_size=cfg.batch_size)
    return out["loss"]


# -------------------------------------------------------------------------------------------------- the loop
@dataclass
class SearchResult:
    best: Factors
    best_loss: float
    init: Factors
    init_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0

    @property
    def best_ppl(self) -> float:
        return math.exp(min(self.best_loss, 50.0))

    @property
    def init_ppl(self) -> float:
        return math.exp(min(self.init_loss, 50.0))


Reporter = Callable[[str, dict[str, Any]], None]  # ("eval" | "generation", info)


def longrope_search(
    model: torch.nn.Module,
    documents: Sequence[np.ndarray],
    cfg: SearchConfig,
    out_dir: Path | None = None,
    *,
    reporter: Reporter | None = None,
    meta: dict[str, Any] | None = None,
) -> SearchResult:
    """Run (or continue, when `out_dir/state.json` exists) the search; the model's rope is left at the best factors.

    `meta` (e.g. checkpoint and data paths) is stored in the state and must match on resume.
    """
    spec = base_spec(model.config)  # the pre-extension base; L0 is the search's own
    spec = RotarySpec(head_dim=spec.head_dim, base=spec.base, original_max_position_embeddings=cfg.original,
                      max_position_embeddings=cfg.target_length, partial_rotary_factor=spec.partial_rotary_factor)
    report = reporter or (lambda kind, info: None)
    identity = {**cfg.identity(), **(meta or {})}
    state_path = out_dir / "state.json" if out_dir is not None else None
    state = _load_state(state_path, identity) if state_path is not None else None
    if state is None:
        init = initial_factors(spec, cfg)
        state = {"version": STATE_VERSION, "identity": identity, "generation": -1, "init": init,
                 "ranked": [], "evaluated": {}, "history": []}
    evaluated: dict[str, float] = state["evaluated"]
    init = state["init"]

    def evaluate(candidates: list[Factors], generation: int) -> None:
        for cand in candidates:
            key = _key(cand)
            if key in evaluated:
                continue
            evaluated[key] = fitness(model, documents, cand, cfg)
            best = min(evaluated.values())
            report("eval", {"generation": generation, "loss": evaluated[key], "best_loss": best,
                            "evaluations": len(evaluated)})

    for generation in range(state["generation"] + 1, cfg.generations + 1):
        started = time.time()
        candidates = next_population(generation, init, state["ranked"], cfg, evaluated)
        evaluate(candidates, generation)
        ranked = sorted(candidates, key=lambda c: (evaluated[_key(c)], _key(c)))
        losses = [evaluated[_key(c)] for c in candidates]
        row = {"generation": generation, "best_loss": evaluated[_key(ranked[0])],
               "best_ppl": math.exp(min(evaluated[_key(ranked[0])], 50.0)),
               "mean_loss": float(np.mean(losses)), "worst_loss": float(max(losses)),
               "evaluations": len(evaluated), "seconds": round(time.time() - started, 3)}
        state.update(generation=generation, ranked=ranked, history=[*state["history"], row])
        if out_dir is not None:
            _write_outputs(out_dir, state, cfg)
        report("generation", row)

    if not state["ranked"]:  # generations < 0 cannot happen; 0 generations still evaluates the start
        raise SearchError("the search evaluated no candidate")
    best = state["ranked"][0]
    apply_rope(model, longrope_setting(best, cfg))
    return SearchResult(best=best, best_loss=evaluated[_key(best)], init=init, init_loss=evaluated[_key(init)],
                        history=state["history"], evaluations=len(evaluated))


def next_population(generation: int, init: Factors, ranked: list[Factors], cfg: SearchConfig,
                    evaluated: dict[str, float]) -> list[Factors]:
    """Generation 0: the YaRN ramp and its mutations. Later: the best half of `ranked` (parents), then
    mutations and crossovers of them. Each generation has its own RNG (seed, generation): resuming draws alike."""
    rng = np.random.default_rng([cfg.seed, generation])
    if generation == 0:
        return _fill([init], cfg.population, lambda k: mutate(init, rng, cfg), evaluated)
    parents = ranked[: cfg.parents]
    n_mut = (cfg.population - len(parents) + 1) // 2  # children: half mutations, half crossovers

    def child(k: int) -> Factors:
        if k < n_mut or len(parents) < 2:
            return mutate(parents[int(rng.integers(len(parents)))], rng, cfg)
        i, j = rng.choice(len(parents), size=2, replace=False)
        return crossover(parents[int(i)], parents[int(j)], rng, cfg)

    return _fill(list(parents), cfg.population, child, evaluated)


def _fill(seed: list[Factors], size: int, make: Callable[[int], Factors],
          evaluated: dict[str, float]) -> list[Factors]:
    """`seed` plus new candidates `make(k)` (k = index among the new ones) up to `size`, avoiding duplicates."""
    out, seen = list(seed), {_key(c) for c in seed}
    tries = 0
    while len(out) < size and tries < 20 * size:
        tries += 1
        cand = make(len(out) - len(seed))
        key = _key(cand)
        if key in seen or (key in evaluated and tries < 10 * size):
            continue  # a repeat costs nothing but teaches nothing; accept old ones only when stuck
        assert is_monotone(cand), cand
        out.append(cand)
        seen.add(key)
    return out


# ------------------------------------------------------------------------------------------------ state + output
def _load_state(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SearchError(f"{path}: cannot read the search state ({e}); delete it to start over") from None
    if state.get("version") != STATE_VERSION:
        raise SearchError(f"{path}: state version {state.get('version')} is not {STATE_VERSION}; delete it")
    old = state.get("identity", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff)
        raise SearchError(f"{path}: belongs to a different search ({changes}); use another --out or delete it")
    return state


def recipe_snippet(factors: Sequence[float], cfg: SearchConfig, loss: float, init_loss: float) -> str:
    """A recipe `rope:` block (YAML) with the found long factors."""
    fmt = lambda xs: "[" + ", ".join(repr(float(x)) for x in xs) + "]"  # noqa: E731 (exact: reproduces the loss)
    return (
        f"# LongRoPE factors from `midtrain rope search` (seed {cfg.seed}, population {cfg.population}):\n"
        f"# loss at {cfg.target_length} tokens {loss:.4f} (ppl {math.exp(min(loss, 50)):.3f}); "
        f"YaRN-ramp start {init_loss:.4f} (ppl {math.exp(min(init_loss, 50)):.3f})\n"
        "# Train it in a stage with seq_len > L0 whose documents are longer than L0 (else the short factors train).\n"
        "rope:\n"
        "  method: longrope\n"
        f"  original_max_position_embeddings: {cfg.original}\n"
        f"  factor: {cfg.factor:g}\n"
        f"  short_factor: {fmt([1.0] * len(factors))}\n"
        f"  long_factor: {fmt(factors)}\n"
    )


def _write_outputs(out_dir: Path, state: dict[str, Any], cfg: SearchConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated = state["evaluated"]
    best = state["ranked"][0]
    best_loss, init_loss = evaluated[_key(best)], evaluated[_key(state["init"])]
    write_text_atomic(out_dir / "rope.yaml", recipe_snippet(best, cfg, best_loss, init_loss))
    write_json_atomic(out_dir / "history.json", {
        "target_length": cfg.target_length, "original": cfg.original, "factor": cfg.factor,
        "init": {"long_factor": state["init"], "loss": init_loss, "ppl": math.exp(min(init_loss, 50.0))},
        "best": {"long_factor": best, "loss": best_loss, "ppl": math.exp(min(best_loss, 50.0))},
        "evaluations": len(evaluated), "history": state["history"],
    })
    write_json_atomic(out_dir / "state.json", state)  # last: a state never runs ahead of the outputs


# ------------------------------------------------------------------------------------------------------ data
