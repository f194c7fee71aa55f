"""Checks of a parsed `RopeSetting` against its stage (training, seq_len) and its base model (head_dim, base, L0).

`rope_issues` is the one check; `stage_rope_issues` runs it over a recipe's stages (recipe check without a base,
run launch with the base's config), `validate_rope` is its string form for a raw mapping. Differences between
methods come from their traits (`midtrain.context.methods`), not from their names. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from midtrain.context.methods import (
    RECORD,
    RotarySpec,
    base_spec,
    resolve,
    rope_layer_parameters,
    yarn_correction_range,
)
from midtrain.context.remap import default_layer_types, has_rotary, remap_rope, trial_rope
from midtrain.context.setting import Path, RopeIssue, RopeSetting, RopeSettingError, parse_rope_issues


def rope_issues(
    setting: RopeSetting | None,
    *,
    seq_len: int | None = None,
    spec: RotarySpec | None = None,
    training: bool = True,
    path: Path = ("rope",),
) -> list[RopeIssue]:
    """Problems of a parsed setting in use: `training` refuses inference-only methods, `seq_len` (the stage's packed
    length) enables the factor-vs-length checks, `spec` (the model's rotary spec, `base_spec(config)`) the checks
    that need head_dim, the base and an L0 the config already has. Errors and warnings, paths under `path`."""
    if setting is None:
        return []
    return _check(setting, seq_len, spec, training, path, parsed_clean=True)


def _check(
    setting: RopeSetting, seq_len: int | None, spec: RotarySpec | None, training: bool, path: Path, parsed_clean: bool
) -> list[RopeIssue]:
    m, params = setting.info, setting.params
    out: list[RopeIssue] = []

    def err(key: str, msg: str) -> None:
        out.append(RopeIssue((*path, key), msg))

    def warn(key: str, msg: str) -> None:
        out.append(RopeIssue((*path, key), msg, "warning"))

    if m.inference_only and training:
        err("method", f"{setting.method!r} is inference-only: it rescales from max(position_ids)+1 of each batch, "
            "and with packed documents that restart positions it trains a mix of bases; train with yarn, ntk, "
            "abf or linear and use dynamic only at evaluation")
    if spec is not None:
        for key in ("short_factor", "long_factor"):  # per-dimension parameters
            if key in m.params and isinstance(params.get(key), list) and len(params[key]) != spec.dim // 2:
                err(key, f"needs d/2 = {spec.dim // 2} entries, one per rotated dimension pair "
                    f"(got {len(params[key])})")
    original = params.get("original_max_position_embeddings") or (
        spec.original_max_position_embeddings if spec else None
    )
    if m.needs_original and not original:
        err("original_max_position_embeddings",
            f"required by {setting.method!r}: the pre-training length L0; without it transformers falls back to "
            "max_position_embeddings (the extended length) and the remap changes meaning")
    if out or not parsed_clean:
        return out

    # What the export will be (needs a spec for base / head_dim).
    factor = params.get("factor")
    exported_len = None
    if spec is not None:
        try:
            resolved, _ = resolve(setting.method, params, spec)
        except ValueError as e:
            err("method", str(e))
            return out
        exported_len = resolved.max_position_embeddings
        if "beta_fast" in m.params:  # a YaRN ramp
            _check_ramp(resolved, params, warn)
    explicit = params.get("max_position_embeddings")
    if explicit is not None and factor is not None and original:
        if m.expects_scaled_length and explicit != round(factor * original):
            warn("max_position_embeddings", f"{setting.method} expects factor x L0 = {round(factor * original)} "
                 f"(got {explicit}); transformers warns and uses the explicit factor")
        if m.length == "original" and explicit > original:
            warn("max_position_embeddings", f"{setting.method} is the identity up to max_position_embeddings: "
                 f"at {explicit} it leaves lengths {original}..{explicit} unscaled")

    if seq_len is None or not original:
        return out
    if m.switches_at == "original":
        if seq_len <= original:
            err("original_max_position_embeddings",
                f"{setting.method} uses long_factor only beyond L0={original}, and this stage's seq_len is "
                f"{seq_len}: it would train the short factors only")
        else:
            warn("method", f"{setting.method} picks long_factor from max(position_ids)+1 of each batch; position ids "
                 f"restart per packed document, so documents shorter than L0={original} train the short factors. "
                 "Make sure the stage's data has documents longer than L0")
    if factor is not None and m.factor_is_extension:
        ratio = seq_len / original
        if not math.isclose(factor, ratio, rel_tol=1e-9):
            warn("factor", f"factor {factor:g} extends L0={original} to {factor * original:g} tokens, but the "
                 f"stage trains at seq_len {seq_len} (= {ratio:g} x L0)")
    if exported_len is not None and m.length == "scaled" and seq_len > exported_len:
        warn("factor", f"seq_len {seq_len} is beyond the extended length {exported_len}")
    return out


def _check_ramp(spec: RotarySpec, params: Mapping[str, Any], warn: Any) -> None:
    original = spec.original_max_position_embeddings
    assert original is not None
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    kept = original / (2 * math.pi * beta_fast)  # > 1 needed for any dimension to complete beta_fast rotations in L0
    if kept <= 1:
        low, high = yarn_correction_range(spec.dim, spec.base, original, beta_fast, beta_slow,
                                          params.get("truncate", True))
        warn(
            "beta_fast",
            f"at L0={original} no dimension completes beta_fast={beta_fast:g} rotations "
            f"(needs L0 > 2π·beta_fast ≈ {2 * math.pi * beta_fast:.0f}), so the ramp spans dims "
            f"{low}..{high} and YaRN interpolates almost every dimension like PI; for a short L0 scale "
            f"beta_fast down (beta_fast = L0/32 keeps wavelengths below 32 tokens, e.g. "
            f"{max(1.0, original / 32):g})",
        )


# ------------------------------------------------------------------------------------------ over a raw mapping
def setting_issues(
    rope: Any, seq_len: int | None = None, spec_or_config: Any = None, *, training: bool = True,
    path: Path = ("rope",),
) -> list[RopeIssue]:
    """Every problem of a `rope` value (raw mapping or RopeSetting) as `RopeIssue`s: parse, then `rope_issues`.

    `spec_or_config` (a RotarySpec or the model's HF config) enables the checks that need head_dim, the base and
    an L0 already in the config; a config also gives a transformers dict the rope_parameters it merges into, and
    adds the checks against the model (`config_rope_issues`).
    """
    if rope is None:
        return []
    if spec_or_config is not None and not isinstance(spec_or_config, RotarySpec):
        return config_rope_issues(rope, spec_or_config, seq_len=seq_len, training=training, path=path)
    if isinstance(rope, RopeSetting):
        setting, issues = rope, []  # parsed at recipe load, and nothing to merge into
    else:
        setting, issues = parse_rope_issues(rope, path)
    if setting is None:
        return issues
    clean = not any(i.severity == "error" for i in issues)
    return issues + _check(setting, seq_len, spec_or_config, training, path, parsed_clean=clean)


def config_rope_issues(
    rope: Any, config: Any, *, seq_len: int | None = None, training: bool = True, path: Path = ("rope",)
) -> list[RopeIssue]:
    """The problems of `rope` on a model with this HF config, as `apply_rope` would meet them and before: each
    remapped layer type checked with its own rotary spec, a model without rotary embeddings, a result the family's
    own config refuses (Phi-3 takes only longrope), and a warning when the base's own remap (llama3, yarn) is
    replaced rather than composed."""
    if rope is None:
        return []
    if not has_rotary(config):
        _, issues = parse_rope_issues(rope, path)
        return [*issues, RopeIssue(path, f"model type {config.model_type!r} has no rotary position embedding (it "
                                         "learns absolute positions); a rope setting cannot apply to it")]
    issues: list[RopeIssue] = []
    try:
        per_type = rope_layer_parameters(config)
        if per_type is None:
            targets = [(None, dict(getattr(config, "rope_parameters", None) or {}))]
        else:
            parsed, issues = parse_rope_issues(rope, path)
            if parsed is None:
                return issues
            chosen = parsed.layer_types or default_layer_types(list(per_type))
            targets = [(t, per_type[t]) for t in chosen if t in per_type]
        for layer_type, current in targets:
            spec = base_spec(config, layer_type)
            if isinstance(rope, RopeSetting) and rope.form == "method":
                setting, found = rope, []
            else:
                setting, found = parse_rope_issues(rope, path, current=current)
            if setting is not None:
                clean = not any(i.severity == "error" for i in found)
                found += _check(setting, seq_len, spec, training, path, parsed_clean=clean)
            issues += [i for i in found if i not in issues]
    except (ValueError, AttributeError) as e:
        return [*issues, RopeIssue(path, f"cannot read the model's rotary setup: {e}")]
    if any(i.severity == "error" for i in issues):
        return issues
    try:
        remap = remap_rope(config, rope)
        trial_rope(config, remap.rope_parameters, remap.max_position_embeddings)
    except RopeSettingError as e:
        return issues + [i if i.path[:len(path)] == path else i.under(*path[:-1]) for i in e.issues]
    except ValueError as e:
        cause = str(e).removeprefix(f"invalid rope setting for a {config.model_type!r} model: ")
        return issues + [RopeIssue((*path, "method"), f"transformers' {config.model_type!r} config refuses it: "
                                                      f"{cause}")]
    method = rope.get("method", rope.get("rope_type")) if isinstance(rope, Mapping) else None
    # A remap midtrain wrote itself (a length ladder's earlier rung) is replaced by design: factors count from L0.
    own = isinstance(getattr(config, RECORD, None), dict)
    for replaced in [] if own else remap.replaced:
        where = f"the base's {replaced.layer_type} layers already use" if replaced.layer_type else \
            "the base already uses"
        issues.append(RopeIssue((*path, "method"), f"{where} {replaced.description} scaling; this stage's "
                                f"{method} replaces it (computed from rope_theta {replaced.rope_theta:g}), it does "
                                "not compose on top of it", "warning"))
    return issues


def validate_rope(
    rope: Any, seq_len: int | None, spec_or_config: Any = None, *, training: bool = True
) -> list[tuple[str, str]]:
    """`setting_issues` as (severity, "rope.key: message") pairs (the form before RopeIssue)."""
    return [(i.severity, str(i)) for i in setting_issues(rope, seq_len, spec_or_config, training=training)]


def stage_rope_issues(
    stages: Sequence[Any], spec_or_config: Any = None, *, by_name: bool = False
) -> tuple[list[tuple[Path, str]], list[str]]:
    """Every stage's RoPE problems: errors as (field path, message) for recipe errors, warnings as lines.

    `stages` are recipe stages (with `.name`, `.rope`, `.seq_len`; `.rope` a RopeSetting or a raw mapping). The
    field path is ("stages", i, "rope", key...), or ("stages", name, "rope", key...) with `by_name` (what a
    message outside the recipe loader shows). Warnings read "stage 'NAME': rope.key: message".
    """
    errors: list[tuple[Path, str]] = []
    warnings: list[str] = []
    for i, stage in enumerate(stages):
        for issue in setting_issues(stage.rope, stage.seq_len, spec_or_config):
            if issue.severity == "error":
                errors.append((issue.under("stages", stage.name if by_name else i).path, issue.message))
            else:
                warnings.append(f"stage {stage.name!r}: {issue}")
    if spec_or_config is not None and not isinstance(spec_or_config, RotarySpec) and not errors:
        length_errors, length_warnings = _length_issues(stages, spec_or_config, by_name)
        errors += length_errors
        warnings += length_warnings
    return errors, warnings


def _length_issues(stages: Sequence[Any], config: Any, by_name: bool) -> tuple[list[tuple[Path, str]], list[str]]:
    """Each stage's seq_len against the positions the base (and the RoPE of the stages so far) declare: beyond a
    learned position table it cannot run (error); beyond a RoPE model's max_position_embeddings it runs at
    positions the model was not set up for (warning)."""
    declared = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    errors: list[tuple[Path, str]] = []
    warnings: list[str] = []
    if not declared:
        return errors, warnings
    rotary = has_rotary(config)
    for i, stage in enumerate(stages):
        key = stage.name if by_name else i
        if not rotary:
            if stage.seq_len > declared:
                errors.append((("stages", key, "seq_len"), f"{stage.seq_len} is beyond the {declared} positions "
                               f"model type {config.model_type!r} learned (absolute position embeddings, no RoPE "
                               f"to extend); use seq_len <= {declared}"))
            continue
        if stage.rope:
            try:
                declared = max(declared, remap_rope(config, stage.rope).max_position_embeddings or 0)
            except ValueError:
                pass  # reported with the setting
        if stage.seq_len > declared:
            warnings.append(f"stage {stage.name!r}: seq_len {stage.seq_len} is beyond the {declared} positions the "
                            f"base and the stages' RoPE declare (max_position_embeddings); extend RoPE in this stage "
                            f"(e.g. yarn, factor {stage.seq_len / declared:g}) or the model runs at positions it "
                            "was not set up for")
    return errors, warnings
