"""Setting a stage up: the tokenizer and tokenized sources of the run, a stage's start model, loader and held-out
batches, and the previous stage's final checkpoint it continues from."""

from __future__ import annotations

from pathlib import Path

import torch

from midtrain.config import Recipe
from midtrain.context import apply_rope
from midtrain.data import PackedLoader, TokenizedSource, byte_tokenizer, default_cache_dir
from midtrain.data.instruct import resize_embeddings
from midtrain.data.loader import BranchLoader
from midtrain.data.mixture import source_buckets
from midtrain.data.prepare import apply_special_tokens, check_epoch_caps, data_warnings, tokenize_recipe_sources
from midtrain.eval.heldout import pack_documents
from midtrain.model import build_model, load_model, load_tokenizer, preset_config
from midtrain.model.convert import convert_model, converted_skeleton, describe
from midtrain.model.families import choose_attention
from midtrain.plan import StagePlan
from midtrain.run.context import RunContext, RunError, StageTarget
from midtrain.train import checkpoint as ckpt
from midtrain.train.distributed import DistInfo, barrier
from midtrain.train.state import Saved
from midtrain.train.trainer import TrainerState


def resolve_tokenizer(recipe: Recipe):
    """The recipe's tokenizer: `bytes`, a local dir, or the base checkpoint's own."""
    base = recipe.base_ref
    if recipe.tokenizer == "bytes":
        return byte_tokenizer()
    if recipe.tokenizer:
        return load_tokenizer(recipe.tokenizer)
    if base.is_preset:
        raise RunError("a preset base has no tokenizer: set `tokenizer:` (a local dir, or `bytes`)")
    return load_tokenizer(base.name, allow_hub=base.allow_hub)


def base_config(recipe: Recipe, tokenizer):
    """The base model's config, without loading its weights."""
    import transformers

    base = recipe.base_ref
    if base.is_preset:
        return preset_config(base.name, vocab_size=len(tokenizer))
    return transformers.AutoConfig.from_pretrained(base.name, local_files_only=not base.allow_hub,
                                                   trust_remote_code=recipe.trust_remote_code)


def tokenize_all(recipe: Recipe, tokenizer, dist: DistInfo, report_dir: Path, log=None) -> list[TokenizedSource]:
    """Rank 0 fills the shared cache first; the other ranks then read it (no duplicate work, no races). `log` gets a
    line per source as it is ready (tokenizing a large source takes a while)."""
    cache = default_cache_dir()
    apply_special_tokens(recipe, tokenizer)  # every rank: the tokenizer object is per process

    decontaminated = {s.name for s in recipe.sources if s.decontaminate} if recipe.decontaminate else set()

    def tokenize_every_source(reports: Path | None, on_source=None, on_progress=None) -> list[TokenizedSource]:
        return tokenize_recipe_sources(recipe, tokenizer, cache_dir=cache, report_dir=reports, on_source=on_source,
                                       on_progress=on_progress)

    def ready(source: TokenizedSource) -> None:
        if log is not None:
            log(f"data: source {source.name!r}: {source.n_docs:,} documents, {source.n_tokens:,} tokens")

    def progress(name: str, documents: int, tokens: int) -> None:
        if log is not None:
            doing = "decontaminating and tokenizing" if name in decontaminated else "tokenizing"
            # the other ranks hold their devices idle at the barrier meanwhile: say so, and how to avoid it
            waiting = (f" (ranks 1-{dist.world_size - 1} wait for it; `midtrain data tokenize RECIPE` does this "
                       "ahead of the job)") if dist.world_size > 1 else ""
            log(f"data: source {name!r}: {doing}... {documents:,} documents, {tokens:,} tokens so far{waiting}")

    sources = tokenize_every_source(report_dir, ready, progress) if dist.is_main else None
    barrier()
    sources = sources if sources is not None else tokenize_every_source(None)
    problems = check_epoch_caps(recipe, sources)
    if problems:
        raise RunError("\n".join(problems) + "\n(raise max_epochs, add data, or lower the weights)")
    if log is not None and dist.is_main:
        for warning in data_warnings(recipe, sources):
            log(f"warning: {warning}")
    return sources


def previous_final(ctx: RunContext, stage: StagePlan) -> Saved:
    """The final checkpoint of the stage before `stage`, which `stage` continues from (optimizer, cursors, RNG)."""
    prev = ctx.plan.stages[stage.index - 1]
    path = ctx.stage_layout(prev).checkpoint(prev.first_step + prev.steps)
    if not (path / ckpt.MANIFEST).is_file():
        raise RunError(f"stage {stage.name!r} (init: {stage.init}) needs {path}, which is missing or incomplete")
    return Saved.read(path)


def start_source(ctx: RunContext, stage: StagePlan) -> str:
    """What a stage starts from, as its before-eval records it: the previous stage's export, or the base."""
    return str(ctx.stage_layout(ctx.plan.stages[stage.index - 1]).export) if stage.index else ctx.recipe.base


def _start_weights(ctx: RunContext, stage: StagePlan, seed: int):
    base = ctx.recipe.base_ref
    trust = ctx.recipe.trust_remote_code
    if stage.index > 0 and stage.init != "scratch":
        return load_model(ctx.stage_layout(ctx.plan.stages[stage.index - 1]).export, trust_remote_code=trust)
    if base.is_preset:
        config = preset_config(base.name, vocab_size=len(ctx.tokenizer), bos_token_id=ctx.tokenizer.bos_token_id,
                               eos_token_id=ctx.tokenizer.eos_token_id, pad_token_id=ctx.tokenizer.pad_token_id)
        return build_model(config, seed=seed)
    if stage.init == "scratch":
        return build_model(base_config(ctx.recipe, ctx.tokenizer), seed)  # the config only: no weights to read
    return load_model(base.name, allow_hub=base.allow_hub, trust_remote_code=trust)


def initial_model(ctx: RunContext, stage: StagePlan, *, resuming: bool = False, conversions: list | None = None):
    """The stage's starting weights: base, previous export, or a fresh init; then its conversion and RoPE setting.

    A stage with `convert` trains the converted model; when `resuming`, only the converted architecture is built (its
    own checkpoint holds the weights), and each conversion's report is appended to `conversions`.
    """
    recipe, seed = ctx.recipe, ctx.recipe.seed + stage.index
    model = _start_weights(ctx, stage, seed)
    if recipe.special_tokens:  # tokens the recipe added: grow the base's embeddings (seeded: resumable)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resize_embeddings(model, len(ctx.tokenizer))
    if model.get_input_embeddings().num_embeddings < len(ctx.tokenizer):
        raise RunError(
            f"tokenizer has {len(ctx.tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    spec = recipe.stages[stage.index].convert
    if spec is not None:  # docs/CONVERSION.md
        if resuming:
            model = converted_skeleton(model, spec, seed=seed)
        else:
            probe = heldout_batches(ctx, stage)[:1]
            model, report = convert_model(model, spec, seed=seed, probe=probe[0] if probe else None)
            if conversions is not None:
                conversions.append(report)
    apply_rope(model, recipe.stages[stage.index].rope)
    model.set_attn_implementation(choose_attention(model.config, recipe.attention).implementation)
    model.config.use_cache = False
    return model


def make_loader(ctx: RunContext, stage: StagePlan, target: StageTarget) -> tuple[PackedLoader, list[int]]:
    """The stage's loader over the sources its mixture uses (and their indices in the recipe's source list)."""
    names = [s.name for s in ctx.recipe.sources]
    used = [names.index(n) for n in stage.mixture]
    stage_cfg = ctx.recipe.stages[stage.index]
    kwargs = dict(
        seed=ctx.recipe.seed,
        seq_len=stage.seq_len,
        global_batch_seqs=stage.seqs_per_step,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        micro_batch=stage_cfg.batch.micro,
        split_documents=stage_cfg.data.split_documents,
        length_buckets=[source_buckets(stage_cfg.data, ctx.sources[i]) for i in used],
    )
    sources, weights = [ctx.sources[i] for i in used], [stage.mixture[names[i]] for i in used]
    if target.is_branch:
        loader = BranchLoader(sources, weights, branch_seed=target.branch_seed, starts=target.starts, **kwargs)
    else:
        loader = PackedLoader(sources, weights, **kwargs)
    return loader, used


class GlobalSourceIds:
    """Maps the loader's per-stage source indices to the recipe's source list (what metrics are keyed by)."""

    def __init__(self, loader: PackedLoader, used: list[int]):
        self.loader = loader
        self.lookup = torch.tensor([*used, -1])  # index -1 (padding) maps to -1

    def next_step(self):
        steps = self.loader.next_step()
        for mb in steps:
            mb["source_ids"] = self.lookup[mb["source_ids"]]
        return steps


def heldout_batches(ctx: RunContext, stage: StagePlan) -> list[dict]:
    max_docs = ctx.recipe.stages[stage.index].eval.max_docs
    # instruction sources carry their loss mask: held-out loss scores response tokens only, as training does
    docs = [(d, i, m) for i, s in enumerate(ctx.sources)
            for d, m in zip(s.holdout_docs()[:max_docs], s.holdout_masks()[:max_docs])]
    return pack_documents(docs, stage.seq_len) if docs else []


def log_conversion(ctx: RunContext, target: StageTarget, stage: StagePlan, state: TrainerState, report) -> None:
    ctx.print(f"stage {stage.name!r}: {describe(report)}")
    drift = {k: report.drift[k] for k in ("rel_logits_error", "loss_before", "loss_after") if k in report.drift}
    target.metrics.write({"event": "convert", "step": state.global_step, "tokens": state.global_tokens,
                          "stage": stage.name, "kind": report.kind, "changed_params": len(report.changed), **drift})
