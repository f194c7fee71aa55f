"""`seeds: [1, 2, 3]`: K branches of one stage from the same start, each with its own data order, souped.

Each branch is a sub-run in `stages/<stage>/seed-<k>/` (checkpoints/, hf/, eval.json, metrics.jsonl) trained by the
ordinary stage loop; only the order of the documents not yet consumed differs (BranchLoader). When every branch is
done, their exports are averaged uniformly (midtrain.merge.soup) into the stage's export `stages/<stage>/hf/`: what
the stage's after-eval and gate judge and what the next stage loads. A soup checkpoint
`checkpoints/<stage>/step-<N>/` (mean of the branches' fp32 weights; optimizer state and RNG of the first branch;
per source the furthest branch's loader cursor) carries the run on exactly as a plain stage's final checkpoint does.
Resumable: a finished branch is skipped, an interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from midtrain.data import PackedLoader
from midtrain.io import fsync_dir, fsync_tree, write_json_atomic
from midtrain.merge.soup import merge_checkpoints
from midtrain.model import load_model
from midtrain.plan import StagePlan
from midtrain.train import checkpoint as ckpt
from midtrain.train.distributed import barrier
from midtrain.train.preemption import Preempted, PreemptionGuard
from midtrain.train.run import (
    RunContext,
    RunError,
    _evaluate,
    _export,
    _heldout_batches,
    _initial_model,
    _previous_final,
    print_main,
    run_stage,
    stage_finished,
)
from midtrain.train.trainer import TrainerState

Starts = dict[str, tuple[int, int]]  # source name -> (epoch, first position not yet consumed)


class BranchLoader(PackedLoader):
    """Reads the same documents as the plain loader would, in another order: in each source's permutation the
    positions consumed before the stage keep their documents, the rest of that epoch (and every later epoch) is
    reshuffled by `branch_seed`. Cursors keep their meaning, so state, resume and hand-over work unchanged."""

    def __init__(self, sources, weights, *, branch_seed: int, starts: Starts, **kwargs):
        super().__init__(sources, weights, **kwargs)
        self.branch_seed, self.starts = branch_seed, starts
        self._branch_perms: dict[int, tuple[tuple, np.ndarray]] = {}

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        base = super().permutation(source, epoch)
        name = self.sources[source].name
        first_epoch, first_pos = self.starts.get(name, (0, 0))
        if epoch < first_epoch:
            return base
        key = (self._cursors[source].seed, epoch)
        cached = self._branch_perms.get(source)
        if cached is None or cached[0] != key:
            lo = first_pos if epoch == first_epoch else 0
            rng = np.random.default_rng([self.branch_seed, zlib.crc32(name.encode()), epoch])
            order = base.copy()
            order[lo:] = base[lo:][rng.permutation(len(base) - lo)]
            cached = (key, order)
            self._branch_perms[source] = cached
        return cached[1]


def branch_starts(cursors: dict[str, dict]) -> Starts:
    """Where each source's unconsumed documents begin, from the loader cursors a stage starts with."""
    starts = {}
    for name, c in cursors.items():
        epoch, pos = int(c["epoch"]), int(c["cursor"]) + (1 if c["offset"] else 0)  # a started document stays put
        if pos >= int(c["n_docs"]):
            epoch, pos = epoch + 1, 0
        starts[name] = (epoch, pos)
    return starts


def furthest_cursors(branch_cursors: list[dict[str, dict]]) -> dict[str, dict]:
    """Per source the cursor of the branch that read furthest, moved past a half-read document (in the next
    stage's order it would be another document)."""
    out = {}
    for name in branch_cursors[0]:
        c = dict(max((b[name] for b in branch_cursors), key=lambda d: (d["epoch"], d["cursor"], d["offset"])))
        if c["offset"]:
            c["cursor"], c["offset"] = c["cursor"] + 1, 0
        if c["cursor"] >= c["n_docs"]:
            c["epoch"], c["cursor"] = c["epoch"] + 1, 0
        out[name] = c
    return out


@dataclass
class BranchContext(RunContext):
    """A RunContext whose paths for the souped stage point into `stages/<stage>/seed-<k>/` (run_dir)."""

    parent: RunContext | None = None
    branch_of: str = ""
    branch_seed: int = 0
    starts: Starts = field(default_factory=dict)

    def _ours(self, stage: StagePlan) -> bool:
        return stage.name == self.branch_of

    def stage_dir(self, stage: StagePlan) -> Path:
        return self.run_dir if self._ours(stage) else self.parent.stage_dir(stage)

    def export_dir(self, stage: StagePlan) -> Path:
        return self.run_dir / "hf" if self._ours(stage) else self.parent.export_dir(stage)

    def ckpt_root(self, stage: StagePlan) -> Path:
        return self.run_dir / "checkpoints" if self._ours(stage) else self.parent.ckpt_root(stage)

    def eval_path(self, stage: StagePlan, when: str) -> Path:
        if not self._ours(stage) or when == "before":  # the stage's before-eval is shared by its branches
            return self.parent.eval_path(stage, when)
        return self.run_dir / ("eval.raw.json" if when == "raw" else "eval.json")

    def evaluates_start(self, stage: StagePlan) -> bool:
        return not self._ours(stage)

    def new_loader(self, stage: StagePlan, sources: list, weights: list, **kwargs) -> PackedLoader:
        if not self._ours(stage):
            return super().new_loader(stage, sources, weights, **kwargs)
        return BranchLoader(sources, weights, seed=self.recipe.seed, branch_seed=self.branch_seed,
                            starts=self.starts, **kwargs)


def branch_dir(ctx: RunContext, stage: StagePlan, seed: int) -> Path:
    return ctx.stage_dir(stage) / f"seed-{seed}"


def branch_context(ctx: RunContext, stage: StagePlan, seed: int) -> BranchContext:
    cursors = ckpt.read_trainer_state(_previous_final(ctx, stage))["loader_cursors"] if stage.index else {}
    return BranchContext(ctx.recipe, ctx.plan, ctx.dist, branch_dir(ctx, stage, seed), ctx.tokenizer, ctx.sources,
                         ctx.domains, ctx.options, ctx.precision, parent=ctx, branch_of=stage.name,
                         branch_seed=seed, starts=branch_starts(cursors))


def _check_fingerprints(ctx: RunContext, stage: StagePlan) -> None:
    for seed in ctx.recipe.stages[stage.index].seeds:
        bctx = branch_context(ctx, stage, seed)
        info, latest = bctx.export_dir(stage) / "midtrain.json", ckpt.latest_checkpoint(bctx.ckpt_root(stage))
        if info.is_file():
            recorded = json.loads(info.read_text()).get("fingerprint")
        else:
            recorded = ckpt.read_trainer_state(latest).get("fingerprint") if latest else None
        if recorded and recorded != stage.fingerprint and not ctx.options.force_recipe_change:
            raise RunError(f"{bctx.run_dir}: branch seed {seed} of stage {stage.name!r} was trained with a different "
                           f"recipe (fingerprint {recorded}, now {stage.fingerprint}); use a new run_dir, or "
                           "--force-recipe-change to continue anyway")


def run_branches(ctx: RunContext, stage: StagePlan, guard: PreemptionGuard | None = None) -> TrainerState:
    seeds = ctx.recipe.stages[stage.index].seeds
    _check_fingerprints(ctx, stage)
    heldout = _heldout_batches(ctx, stage)
    start = TrainerState(stage_step=0, global_step=stage.first_step, global_tokens=stage.first_tokens)
    if not ctx.eval_path(stage, "before").is_file():  # once for all branches: they share the start model
        model = _initial_model(ctx, stage).to(ctx.dist.device)
        source = str(ctx.export_dir(ctx.plan.stages[stage.index - 1])) if stage.index else ctx.recipe.base
        _evaluate(ctx, stage, model, heldout, "before", start, source)
        ctx.metrics.write({"event": "stage_start", "step": start.global_step, "tokens": start.global_tokens,
                           "stage": stage.name, "init": stage.init, "lr": stage.lr_at_step(0), "seeds": seeds})
        del model
    branches = []
    for seed in seeds:
        bctx = branch_context(ctx, stage, seed)
        branches.append(bctx)
        if stage_finished(bctx, stage):
            print_main(ctx, f"stage {stage.name!r} branch seed-{seed} already finished; skipping")
            continue
        if guard is not None and guard.agreed(ctx.dist.device):  # between branches: nothing in flight to save
            raise Preempted(guard.signal_name, stage.first_step)
        if ctx.dist.is_main:
            bctx.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        print_main(ctx, f"stage {stage.name!r}: branch seed-{seed} ({len(branches)}/{len(seeds)})")
        run_stage(bctx, stage, guard)
        barrier()
    return _soup(ctx, stage, branches, heldout)


def _soup(ctx: RunContext, stage: StagePlan, branches: list[BranchContext], heldout) -> TrainerState:
    final = stage.first_step + stage.steps
    state = TrainerState(stage_step=stage.steps, global_step=final, global_tokens=stage.first_tokens + stage.tokens,
                         last_lr=stage.last_lr)
    work = ctx.stage_dir(stage) / "soup.tmp"
    if ctx.dist.is_main:
        # The checkpoint first: once the export and after-eval exist the stage counts as finished.
        write_soup_checkpoint([b.ckpt_root(stage) / f"step-{final}" for b in branches], ctx.ckpt_root(stage), final)
        merge_checkpoints([b.export_dir(stage) for b in branches], work)
    barrier()
    model = load_model(work)
    model.set_attn_implementation(ctx.recipe.attention)
    model.config.use_cache = False
    model = model.to(ctx.dist.device)
    _export(ctx, stage, model, state)  # the soup with the run's probe and midtrain.json (fingerprint, step, ...)
    seeds = [b.branch_seed for b in branches]
    if ctx.dist.is_main:
        info = ctx.export_dir(stage) / "midtrain.json"
        record = json.loads(info.read_text())
        record["soup"] = {"seeds": seeds, "branches": [str(b.export_dir(stage)) for b in branches]}
        write_json_atomic(info, record)
        shutil.rmtree(work, ignore_errors=True)
    print_main(ctx, f"stage {stage.name!r}: souped {len(branches)} branches (seeds {seeds}) -> "
               f"{ctx.export_dir(stage)}")
    _evaluate(ctx, stage, model, heldout, "after", state, str(ctx.export_dir(stage)))
    ctx.metrics.write({"event": "soup", "step": final, "tokens": state.global_tokens, "stage": stage.name,
                       "seeds": seeds})
    ctx.metrics.write({"event": "stage_end", "step": final, "tokens": state.global_tokens, "stage": stage.name,
                       "lr": state.last_lr})
    return state


def write_soup_checkpoint(sources: list[Path], root: Path, global_step: int) -> Path:
    """`root/step-<N>`: fp32 mean of the branches' weights; optimizer state, RNG and trainer state of the first
    branch, with the loader cursors of whichever branch read furthest per source. Atomic like any checkpoint."""
    for src in sources:
        ckpt.verify(src)
    root.mkdir(parents=True, exist_ok=True)
    out, tmp = root / f"step-{global_step}", root / f"step-{global_step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mean: dict[str, torch.Tensor] = {}
    for src in sources:
        for name, tensor in load_file(str(src / ckpt.MODEL_FILE)).items():
            acc = mean.setdefault(name, torch.zeros_like(tensor, dtype=torch.float32))
            acc.add_(tensor.float(), alpha=1.0 / len(sources))
    save_file(mean, str(tmp / ckpt.MODEL_FILE), metadata={"format": "pt"})
    for name in (ckpt.OPTIM_FILE, ckpt.RNG_FILE):
        if (sources[0] / name).is_file():
            shutil.copy2(sources[0] / name, tmp / name)
    trainer = ckpt.read_trainer_state(sources[0])
    trainer["loader_cursors"] = furthest_cursors([ckpt.read_trainer_state(s)["loader_cursors"] for s in sources])
    trainer["soup_of"] = [str(s) for s in sources]
    (tmp / ckpt.STATE_FILE).write_text(json.dumps(trainer, indent=2))
    ckpt.write_manifest(tmp, global_step)
    fsync_tree(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    fsync_dir(root)
    return out
