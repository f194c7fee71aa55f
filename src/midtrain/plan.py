"""Recipe -> plan: the concrete numbers a run follows (steps, global offsets, LR shape, fingerprints).

The plan is a pure function of the recipe, so `midtrain recipe check` prints exactly what `midtrain run` will do,
and the LR a stage inherits with `start_lr: from_previous` is known before anything trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from midtrain.config import Recipe, Stage, recipe_warnings
from midtrain.schedule import LRSchedule, horizon_tokens_for


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    init: str
    steps: int
    tokens: int  # actually trained: steps * batch_tokens (>= the recipe's budget)
    seq_len: int
    batch_tokens: int
    seqs_per_step: int
    first_step: int  # global step count before this stage
    first_tokens: int  # global tokens before this stage
    schedule: LRSchedule
    mixture: dict[str, float]  # normalised weights over tokens
    fingerprint: str

    def lr_at_step(self, stage_step: int) -> float:
        """LR of the stage's `stage_step`-th optimizer step (0-based): a function of tokens seen before it."""
        return self.schedule.lr(stage_step * self.batch_tokens)

    @property
    def last_lr(self) -> float:
        return self.lr_at_step(self.steps - 1)

    def to_json(self) -> dict:
        out = asdict(self)
        out["schedule"] = asdict(self.schedule)
        out["lr_boundaries"] = self.schedule.boundaries()
        out["last_lr"] = self.last_lr
        return out


@dataclass(frozen=True)
class Plan:
    stages: list[StagePlan]
    warnings: list[str]

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def to_json(self) -> dict:
        return {"stages": [s.to_json() for s in self.stages], "warnings": self.warnings}


_NOT_FINGERPRINTED = {"eval", "gate", "monitor"}  # they change what is measured, not what is trained


def _unset_options(stage: Stage) -> set[str]:
    """Unset later-added options stay out of the hash, so runs recorded before them keep their fingerprints."""
    return {k for k in ("average", "seeds") if getattr(stage, k) is None}


def _fingerprint(recipe: Recipe, stage: Stage, previous: str) -> str:
    """Identifies what a stage computes: its own settings, what it starts from, and the data it reads."""
    used = [s.model_dump(mode="json") for s in recipe.sources if s.name in stage.data.mixture]
    payload = {
        "base": recipe.base,
        "tokenizer": recipe.tokenizer,
        "seed": recipe.seed,
        "precision": recipe.precision,
        "stage": stage.model_dump(mode="json", exclude=_NOT_FINGERPRINTED | _unset_options(stage)),
        "sources": used,
        "previous": previous,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_plan(recipe: Recipe) -> Plan:
    stages: list[StagePlan] = []
    warnings: list[str] = []
    step = tokens = 0
    previous_fp = ""
    for i, stage in enumerate(recipe.stages):
        s = stage.schedule
        start_lr: float | None
        if stage.start_lr == "from_previous":
            start_lr = stages[-1].last_lr
            if start_lr == 0.0 and s.warmup_tokens == 0:  # a warm-up rises from 0 to the peak: nothing to warn
                warnings.append(
                    f"stage {stage.name!r}: start_lr from_previous is 0 (stage {stages[-1].name!r} decays to 0); "
                    "without warm-up this stage trains at LR 0"
                )
        else:
            start_lr = stage.start_lr
        # Without warm-up a stage starts at its peak, so a start LR *is* the peak (recipe_problems rejects conflicts).
        peak = start_lr if (s.warmup_tokens == 0 and start_lr is not None) else s.peak_lr
        steps = stage.steps
        schedule = LRSchedule(
            kind=s.kind,
            peak_lr=float(peak),
            horizon_tokens=horizon_tokens_for(steps, stage.batch.tokens),
            start_lr=float(start_lr) if (start_lr is not None and s.warmup_tokens > 0) else 0.0,
            min_lr=s.min_lr,
            warmup_tokens=s.warmup_tokens,
            decay_fraction=s.decay_fraction,
            decay_shape=s.decay_shape,
            half_life=s.half_life,
        )
        mixture = recipe.effective_mixture(i)  # normalised, with replay of an earlier stage resolved
        previous_fp = _fingerprint(recipe, stage, previous_fp)
        stages.append(
            StagePlan(
                index=i,
                name=stage.name,
                init=recipe.stage_init(i),
                steps=steps,
                tokens=steps * stage.batch.tokens,
                seq_len=stage.seq_len,
                batch_tokens=stage.batch.tokens,
                seqs_per_step=stage.seqs_per_step,
                first_step=step,
                first_tokens=tokens,
                schedule=schedule,
                mixture=mixture,
                fingerprint=previous_fp,
            )
        )
        step += steps
        tokens += steps * stage.batch.tokens
    warnings += recipe_warnings(recipe)
    return Plan(stages=stages, warnings=warnings)
