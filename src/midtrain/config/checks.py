"""A recipe's cross-field checks: what no single field's schema can say (names, stage order, start LR, lengths,
RoPE settings, eval tasks and gates, averaging), each reported against the field a user would edit. Torch-free."""

from __future__ import annotations

from collections.abc import Iterable

from midtrain.config.recipe import Recipe
from midtrain.context.checks import stage_rope_issues
from midtrain.eval.gates import stage_eval_problems

Problem = tuple[tuple[str | int, ...], str]


def recipe_problems(recipe: Recipe) -> list[Problem]:
    """Checks that span fields, each reported against the field a user would edit."""
    problems: list[Problem] = []
    for what, items in (("stages", recipe.stages), ("sources", recipe.sources)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(((what, i, "name"), f"duplicate name {item.name!r}"))
            seen.add(item.name)
    if not recipe.sources:
        problems.append((("sources",), "at least one data source is required to train"))
    known = {s.name for s in recipe.sources}
    for i, stage in enumerate(recipe.stages):
        at = ("stages", i)
        if stage.batch.tokens % stage.seq_len:
            problems.append(
                ((*at, "batch", "tokens"), f"must be a multiple of seq_len ({stage.seq_len}), got {stage.batch.tokens}")
            )
        problems += unknown_mixture_sources(at, stage.data.mixture, known)
        if recipe.sources and not stage.data.mixture:
            problems.append(((*at, "data", "mixture"), "must name at least one source with a weight"))
        for name in stage.data.source_length_buckets:
            try:
                in_stage = name in recipe.effective_mixture(i)
            except ValueError:
                in_stage = True  # a bad replay is reported below
            if name not in known:
                problems.append(((*at, "data", "source_length_buckets", name), f"unknown source {name!r}"))
            elif not in_stage:
                problems.append(((*at, "data", "source_length_buckets", name),
                                 f"source {name!r} has no weight in this stage's mixture"))
        # seed branches reorder the unconsumed part of a plain cursor; length-segmented cursors (from this or an
        # earlier stage with buckets) have no single such part
        bucketed = any(st.data.length_buckets or st.data.source_length_buckets or st.data.upsample_long
                       for st in recipe.stages[: i + 1])
        if bucketed and stage.seeds is not None:
            problems.append(((*at, "seeds"), "seed branches do not support length buckets / upsample_long (in this "
                             "or an earlier stage) yet"))
        replay = stage.data.replay
        if replay is not None:
            earlier = [s.name for s in recipe.stages[:i]]
            if not earlier:
                problems.append(((*at, "data", "replay"), "the first stage has no earlier stage to replay"))
            elif replay.stage is not None and replay.stage not in earlier:
                problems.append(((*at, "data", "replay", "stage"), f"must name an earlier stage ({earlier})"))
        s = stage.schedule
        if s.peak_lr is None and (stage.start_lr is None or s.warmup_tokens > 0):
            problems.append(
                ((*at, "schedule", "peak_lr"), "required (it may be omitted only with start_lr and no warm-up)")
            )
        if stage.start_lr is not None and s.peak_lr is not None and s.warmup_tokens == 0:
            if s.peak_lr != stage.start_lr:
                problems.append(
                    (
                        (*at, "start_lr"),
                        f"{stage.start_lr} conflicts with schedule.peak_lr ({s.peak_lr}) when warmup_tokens is 0 "
                        "(the stage starts at its peak): set warmup_tokens to re-warm, or drop peak_lr",
                    )
                )
        if s.peak_lr is not None and s.kind != "constant" and s.min_lr > s.peak_lr:
            problems.append(((*at, "schedule", "min_lr"), f"exceeds schedule.peak_lr ({s.peak_lr})"))
        if s.kind != "constant" and s.warmup_tokens > 0 and s.warmup_tokens >= stage.tokens:
            problems.append(
                ((*at, "schedule", "warmup_tokens"), f"must be below the stage's tokens ({stage.tokens})")
            )
    problems += stage_rope_issues(recipe.stages)[0]  # without the base; the run adds the base's rotary spec
    problems += _averaging_problems(recipe)
    first = recipe.stages[0]
    if first.start_lr == "from_previous":
        problems.append(
            (
                ("stages", 0, "start_lr"),
                "from_previous needs a previous stage of this run (an HF base checkpoint carries no learning rate)",
            )
        )
    if first.init in ("weights+optimizer", "resume"):
        problems.append(
            (
                ("stages", 0, "init"),
                f"{first.init} needs a previous stage of this run (a base checkpoint carries no optimizer state)",
            )
        )
    if recipe.is_preset_base and first.init == "weights":
        problems.append((("stages", 0, "init"), f"base {recipe.base!r} is a preset without weights: use scratch"))
    problems += stage_eval_problems(recipe)  # tasks, lengths and gate conditions
    return problems


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What a valid recipe does that is probably not meant (RoPE factor vs seq_len, ...), one line each."""
    return stage_rope_issues(recipe.stages)[1]


def _averaging_problems(recipe: Recipe) -> list[Problem]:
    """monitor / average / seeds: what each needs from the stage (docs/MONITORING.md, docs/AVERAGING.md)."""
    problems: list[Problem] = []
    for i, stage in enumerate(recipe.stages):
        at = ("stages", i)
        gns_every = recipe.stage_monitor(i).gns_every_steps
        where = (*at, "monitor") if stage.monitor else ("monitor",)
        if gns_every is not None:
            micro = stage.batch.micro
            if micro is None or 2 * micro > stage.seqs_per_step:
                problems.append(((*where, "gns_every_steps"), "needs at least 2 micro-batches per step: set "
                                 f"stages.{stage.name}.batch.micro to at most half of its {stage.seqs_per_step} "
                                 "sequences per step"))
            if gns_every % recipe.log_every_steps:
                problems.append(((*where, "gns_every_steps"), f"must be a multiple of log_every_steps "
                                 f"({recipe.log_every_steps}), or the measured rows are not logged"))
        avg = stage.average
        if avg is not None:
            if avg.kind == "tail" and "decay" in avg.model_fields_set:
                problems.append(((*at, "average", "decay"), "applies to kind ema only (tail is a plain mean)"))
            if avg.start == "decay" and stage.schedule.kind == "constant":
                problems.append(((*at, "average", "start"), "'decay' needs a decaying schedule (this stage's is "
                                 "constant): give a token count"))
            if isinstance(avg.start, int) and avg.start >= stage.tokens:
                problems.append(((*at, "average", "start"), f"must be below the stage's tokens ({stage.tokens})"))
        if stage.seeds is not None:
            if len(stage.seeds) < 2 or len(set(stage.seeds)) != len(stage.seeds):
                problems.append(((*at, "seeds"), f"needs at least 2 distinct seeds to soup, got {stage.seeds}"))
            if recipe.stage_init(i) == "scratch":
                problems.append(((*at, "seeds"), "branches must share their start weights: not with init scratch"))
        if recipe.distributed == "fsdp2" and (gns_every is not None or avg is not None):
            problems.append(((*at, "average" if avg else "monitor"), "not supported with distributed: fsdp2 yet "
                             "(use ddp)"))
    return problems


def unknown_mixture_sources(stage_at: tuple, mixture: Iterable[str], known: set[str]) -> list[tuple[tuple, str]]:
    """A stage mixture's names that no source has, at ("stages", i, "data", "mixture", name)."""
    return [((*stage_at, "data", "mixture", name), f"unknown source {name!r}; known: {sorted(known) or 'none'}")
            for name in mixture if name not in known]
