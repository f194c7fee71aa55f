"""Where every file of a run directory lives (docs/CONTRACTS.md §5): the one module that spells those paths.

`RunLayout(run_dir)` names the run-wide files; `layout.stage(name)` the files one stage writes, and
`layout.branch(name, seed)` those of one seed branch of a souped stage (`stages/<stage>/seed-<k>/`), which has its
own checkpoints, export, after-eval and metrics but shares the stage's before-eval. Code that trains or evaluates a
stage takes a `StageLayout` and does not care which of the two it got. Torch-free: the CLI, the report, mixture
search and experiments read runs through it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPORT_INFO = "midtrain.json"  # what midtrain records in each HF export (stage, step, fingerprint, ...)
LOCK_FILE = ".midtrain.lock"
RAW_EXPORT = "hf-raw"  # the un-averaged weights of a stage with `average` (docs/AVERAGING.md)


@dataclass(frozen=True)
class StageLayout:
    """The files one stage (or one seed branch of it) writes."""

    name: str
    dir: Path  # stages/<stage>/ (a branch: stages/<stage>/seed-<k>/)
    checkpoints: Path  # checkpoints/<stage>/ (a branch: its own checkpoints/)
    export: Path  # the HF export: stages/<stage>/hf/
    eval_before: Path  # eval/<stage>-before.json (shared by a stage's branches)
    eval_after: Path  # eval/<stage>.json (a branch: its eval.json)
    eval_raw: Path  # eval/<stage>.raw.json: the raw weights of an averaged stage
    metrics: Path  # metrics.jsonl (a branch: its own)

    @property
    def raw_export(self) -> Path:
        return self.export.with_name(RAW_EXPORT)

    @property
    def export_info(self) -> Path:
        return self.export / EXPORT_INFO

    def checkpoint(self, global_step: int) -> Path:
        return self.checkpoints / f"step-{global_step}"

    def eval(self, when: str) -> Path:
        """`when`: before, after or raw."""
        return {"before": self.eval_before, "after": self.eval_after, "raw": self.eval_raw}[when]


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # run-wide files
    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    def previous_recipe(self, k: int) -> Path:
        """Where the k-th replaced recipe.yaml is kept when a run continues under a changed recipe."""
        return self.root / f"recipe.prev-{k}.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def data(self) -> Path:
        """Curation, decontamination and tokenization reports."""
        return self.root / "data"

    @property
    def curated(self) -> Path:
        """Curated jsonl.gz, one directory per source (unless the recipe's `curation.output` says elsewhere)."""
        return self.data / "curated"

    def curation_work(self, source: str) -> Path:
        """datatrove's intermediate outputs and logs while curating `source`."""
        return self.data / "curation" / source

    def curation_summary(self, source: str) -> Path:
        """What curating `source` kept and removed, per filter."""
        return self.data / "curation" / f"{source}.json"

    @property
    def tokenize_report(self) -> Path:
        return self.data / "tokenize.json"

    @property
    def decontamination_report(self) -> Path:
        return self.data / "decontamination.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def weight_dirs(self) -> list[Path]:
        """The directories holding model weights (checkpoints and exports): what a run that keeps only its
        measurements, such as a mixture-search proxy, deletes."""
        return [self.root / "checkpoints", self.root / "stages"]

    # per stage
    def stage(self, name: str) -> StageLayout:
        return StageLayout(
            name=name,
            dir=self.root / "stages" / name,
            checkpoints=self.root / "checkpoints" / name,
            export=self.root / "stages" / name / "hf",
            eval_before=self.eval_dir / f"{name}-before.json",
            eval_after=self.eval_dir / f"{name}.json",
            eval_raw=self.eval_dir / f"{name}.raw.json",
            metrics=self.metrics,
        )

    def branch(self, name: str, seed: int) -> StageLayout:
        """Seed branch `seed` of the souped stage `name`: a sub-run in stages/<stage>/seed-<k>/."""
        home = self.stage(name).dir / f"seed-{seed}"
        return StageLayout(
            name=name,
            dir=home,
            checkpoints=home / "checkpoints",
            export=home / "hf",
            eval_before=self.stage(name).eval_before,
            eval_after=home / "eval.json",
            eval_raw=home / "eval.raw.json",
            metrics=home / "metrics.jsonl",
        )

    def branch_seeds(self, name: str) -> list[int]:
        """The seeds of the branches found on disk for stage `name`, ascending."""
        found = self.stage(name).dir.glob("seed-*")
        return sorted(int(p.name.removeprefix("seed-")) for p in found if p.name.removeprefix("seed-").isdigit())

    def stage_started(self, name: str) -> bool:
        """Whether anything of stage `name` (its export dir or checkpoints) exists on disk."""
        return self.stage(name).dir.exists() or self.stage(name).checkpoints.exists()

    def gate_failed_attempt(self, name: str, k: int) -> list[tuple[Path, Path]]:
        """(current, set-aside) pairs for the k-th gate-failed attempt of stage `name` (`*.gate-failed-<k>`)."""
        stage, kept = self.stage(name), self.stage(f"{name}.gate-failed-{k}")
        return [(stage.dir, kept.dir), (stage.checkpoints, kept.checkpoints),
                (stage.eval_before, self.eval_dir / f"{name}-before.gate-failed-{k}.json"),
                (stage.eval_after, kept.eval_after)]

    def mix_work(self, kind: str, stage: str) -> Path:
        """Where `midtrain mix search|doremi|value` keeps its runs for `stage` (`kind`: search, doremi or value)."""
        return self.root / "mix" / f"{kind}-{stage}"

    def eval_files(self) -> list[Path]:
        """Every eval JSON of the run (before, after, raw, set-aside attempts), sorted by name."""
        return sorted(self.eval_dir.glob("*.json"))


@dataclass(frozen=True)
class ProxyLayout:
    """One proxy run of `midtrain mix search|value`: its derived recipe, log, run directory and result."""

    dir: Path

    @property
    def recipe(self) -> Path:
        return self.dir / "recipe.yaml"

    @property
    def log(self) -> Path:
        return self.dir / "log.txt"

    @property
    def result(self) -> Path:
        return self.dir / "result.json"

    @property
    def run(self) -> RunLayout:
        return RunLayout(self.dir / "run")

