"""What every step of a run shares: the recipe and its plan, the processes, the run directory, tokenizer and data.

`StageTarget` is where one training of a stage writes (the stage itself, or one seed branch of a souped stage) and
how its loader orders documents; the stage's code takes it and never asks which of the two it got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from midtrain.config import Recipe
from midtrain.data import TokenizedSource
from midtrain.layout import RunLayout, StageLayout
from midtrain.plan import Plan, StagePlan
from midtrain.train.callbacks import MetricsWriter
from midtrain.train.distributed import DistInfo

Starts = dict[str, tuple[int, int]]  # source name -> (epoch, first position not yet consumed)


class RunError(Exception):
    """A run cannot proceed (changed recipe over trained stages, missing previous state, ...)."""


@dataclass
class RunOptions:
    force_recipe_change: bool = False
    tensorboard: bool = False
    wandb: bool = False  # offline W&B (`wandb sync` later); needs the wandb package
    console: object | None = None  # a rich Console for progress bars
    progress: bool = True
    override_gates: tuple[str, ...] = ()  # stages whose failed gate is accepted (`--override-gate`)
    fallback_checkpoint: bool = False  # a corrupted newest checkpoint: resume from the previous good one
    profile_steps: tuple[int, int] | None = None  # global steps A..B traced by torch.profiler into RUN/profile/
    threads: int | str | None = None  # `--threads` (int or auto): overrides the recipe's `threads`


@dataclass
class StageTarget:
    """Where one training of a stage writes, and how its documents are ordered."""

    layout: StageLayout
    metrics: MetricsWriter
    branch_seed: int | None = None  # a seed branch reorders the documents not yet consumed (run.branches)
    starts: Starts = field(default_factory=dict)  # per source, where the unconsumed documents begin

    @property
    def is_branch(self) -> bool:
        return self.branch_seed is not None


@dataclass
class RunContext:
    recipe: Recipe
    plan: Plan
    dist: DistInfo
    layout: RunLayout
    tokenizer: object
    sources: list[TokenizedSource]
    domains: list[str]
    options: RunOptions
    precision: str  # resolved: fp32 or bf16-mixed
    metrics: MetricsWriter = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsWriter(self.layout.metrics, self.dist.is_main, self.recipe.log_every_steps)

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    def stage_layout(self, stage: StagePlan) -> StageLayout:
        return self.layout.stage(stage.name)

    def target(self, stage: StagePlan) -> StageTarget:
        """The stage trained as itself (not as a seed branch)."""
        return StageTarget(self.stage_layout(stage), self.metrics)

    def print(self, message: str) -> None:
        """A line on the console of the main rank (plain text: no rich markup in messages)."""
        if not self.dist.is_main:
            return
        if self.options.console is not None:
            self.options.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)
