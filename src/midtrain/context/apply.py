"""Write a stage's `rope` setting into an HF model: config.rope_parameters plus rebuilt rotary embeddings.

transformers computes inv_freq once when the rotary module is built, so changing the config alone changes nothing
until the module is rebuilt; both must change together or the export would not behave like the trained model.

A stage's `rope` is either midtrain's method form (`{method: yarn, factor: 4, original_max_position_embeddings: 256}`,
translated by `midtrain.context.rope.to_rope_parameters`) or a raw transformers dict (`{rope_type: yarn, ...}`,
merged into the current `rope_parameters` as given). `validate_rope` checks either at recipe-check time.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from midtrain.context.rope import (
    METHODS,
    REQUIRED,
    RotarySpec,
    coerce_param,
    method_params,
    normalize_params,
    resolve,
    to_rope_parameters,
    yarn_correction_range,
)

#: transformers 5.x `rope_parameters` keys per rope_type (required | optional), from `_validate_<type>_rope_parameters`.
HF_ROPE_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "default": (frozenset({"rope_type"}), frozenset({"rope_theta"})),
    "linear": (frozenset({"rope_type", "factor"}), frozenset({"rope_theta"})),
    "dynamic": (frozenset({"rope_type", "factor"}), frozenset({"rope_theta"})),
    "yarn": (
        frozenset({"rope_type", "factor", "original_max_position_embeddings"}),
        frozenset({"rope_theta", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "longrope": (
        frozenset({"rope_type", "short_factor", "long_factor", "original_max_position_embeddings"}),
        frozenset({"rope_theta", "attention_factor", "factor"}),
    ),
    "llama3": (
        frozenset(
            {
                "rope_type",
                "factor",
                "original_max_position_embeddings",
                "low_freq_factor",
                "high_freq_factor",
                "rope_theta",
            }
        ),
        frozenset(),
    ),
}
# Keys a raw dict may carry whatever its type: kept model properties and apply_rope's explicit length.
_HF_ANY_TYPE = frozenset({"partial_rotary_factor", "mrope_section", "max_position_embeddings"})
# Model properties that live in rope_parameters but are not a method's parameter: a replaced dict keeps them.
_KEPT_KEYS = ("partial_rotary_factor", "mrope_section")

RECORD = "midtrain_rope"  # config attribute recording the last method-form remap (saved in config.json)

Issue = tuple[str, str]


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every rotary embedding in an HF model."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding"):
                found.append((parent, attr, child))
    return found


def base_spec(config: Any) -> RotarySpec:
    """The spec a new remap starts from: the config's, except that an NTK-derived theta does not compound.

    A method-form remap records itself in `config.midtrain_rope`. `ntk` derives its theta from the factor, so a
    later stage (or the same setting repeated on a continued model) starts from the theta before it; a theta chosen
    by `abf` or given as `rope_theta` is the model's base from then on.
    """
    spec = RotarySpec.from_config(config)
    record = getattr(config, RECORD, None)
    if isinstance(record, dict) and record.get("method") == "ntk" and record.get("base_rope_theta"):
        spec = RotarySpec(
            head_dim=spec.head_dim,
            base=float(record["base_rope_theta"]),
            original_max_position_embeddings=spec.original_max_position_embeddings,
            max_position_embeddings=spec.max_position_embeddings,
            partial_rotary_factor=spec.partial_rotary_factor,
        )
    return spec


def apply_rope(model: nn.Module, rope: dict[str, Any] | None) -> None:
    """Write `rope` into `config.rope_parameters` / `max_position_embeddings` and rebuild the rotary modules.

    Method form goes through `to_rope_parameters`; a raw transformers dict is merged into the current
    `rope_parameters` (keeping `rope_theta` unless given). Raises ValueError on the errors `validate_rope` reports
    (training-only checks excluded: this also serves evaluation).
    """
    if not rope:
        return
    config = model.config
    errors = [msg for sev, msg in validate_rope(rope, None, config, training=False) if sev == "error"]
    if errors:
        raise ValueError("invalid rope setting: " + "; ".join(errors))
    old = dict(getattr(config, "rope_parameters", None) or {})
    record = None
    if "method" in rope:
        method = rope["method"]
        params = normalize_params(method, rope)
        spec = base_spec(config)
        rope_parameters, max_pos = to_rope_parameters(method, params, spec)
        for key in _KEPT_KEYS:
            if key in old:
                rope_parameters.setdefault(key, old[key])
        record = {"method": method, **params, "base_rope_theta": spec.base}
    else:
        rope_parameters = dict(old)
        new = {k: coerce_param(k, v) for k, v in rope.items()}
        max_pos = new.pop("max_position_embeddings", None)
        if new.get("rope_type", rope_parameters.get("rope_type")) != rope_parameters.get("rope_type"):
            # A different method: drop the old method's parameters, keep the base frequency and model properties.
            rope_parameters = {k: rope_parameters[k] for k in ("rope_theta", *_KEPT_KEYS) if k in rope_parameters}
        rope_parameters.update(new)
        rope_parameters.setdefault("rope_type", "default")
    # Let the model family's own config validation judge the result before the live config changes.
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope_parameters)
    if max_pos is not None:
        trial.max_position_embeddings = int(max_pos)
    if hasattr(trial, "validate_rope"):
        try:
            trial.validate_rope()
        except (KeyError, ValueError) as e:
            raise ValueError(f"invalid rope setting for a {config.model_type!r} model: {e}") from None
    config.rope_parameters = rope_parameters
    if max_pos is not None:
        config.max_position_embeddings = int(max_pos)
    if record is not None or getattr(config, RECORD, None) is not None:
        setattr(config, RECORD, record)  # a raw dict replaces whatever a method form wrote
    for parent, attr, module in rotary_modules(model):
        device = module.inv_freq.device if hasattr(module, "inv_freq") else None
        rebuilt = type(module)(config=config)
        setattr(parent, attr, rebuilt.to(device) if device is not None else rebuilt)


# --------------------------------------------------------------------------------------------------- validation
def _as_spec(spec_or_config: Any) -> RotarySpec | None:
    if spec_or_config is None or isinstance(spec_or_config, RotarySpec):
        return spec_or_config
    return base_spec(spec_or_config)


def _raw_to_method(rope: dict[str, Any], spec_or_config: Any) -> tuple[str, dict[str, Any], list[Issue]]:
    """A raw transformers dict as (method, params) after apply_rope's merge, plus key errors."""
    issues: list[Issue] = []
    current: dict[str, Any] = {}
    if spec_or_config is not None and not isinstance(spec_or_config, RotarySpec):
        current = dict(getattr(spec_or_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", current.get("rope_type", "default"))
    if not isinstance(rope_type, str) or rope_type not in HF_ROPE_KEYS:
        issues.append(
            (
                "error",
                f"rope.rope_type: unknown transformers rope_type {rope_type!r} "
                f"(known: {', '.join(HF_ROPE_KEYS)}; or use method: {', '.join(METHODS)})",
            )
        )
        return rope_type, {}, issues
    required, optional = HF_ROPE_KEYS[rope_type]
    for key in rope:
        if key not in required | optional | _HF_ANY_TYPE:
            issues.append(
                (
                    "error",
                    f"rope.{key}: not a parameter of rope_type {rope_type!r} "
                    f"(known: {', '.join(sorted((required | optional) - {'rope_type'}))})",
                )
            )
    merged = dict(current) if rope_type == current.get("rope_type", "default") else {}
    merged.update(rope)
    merged.pop("rope_type", None)
    params = {k: v for k, v in merged.items() if k in required | optional}
    if rope_type == "default":
        method = "abf" if "rope_theta" in rope else "default"
        if method == "default":
            params.pop("rope_theta", None)
    else:
        method = rope_type
    if "max_position_embeddings" in rope:
        params["max_position_embeddings"] = rope["max_position_embeddings"]
    return method, params, issues


def validate_rope(
    rope: dict[str, Any] | None, seq_len: int | None, spec_or_config: Any = None, *, training: bool = True
) -> list[Issue]:
    """Problems of a stage's `rope` setting as (severity, message), severity "error" or "warning".

    Messages start with the key they are about (`rope.beta_fast: ...`) so a recipe checker can prefix the stage
    path. `spec_or_config` (a RotarySpec or the model's HF config) enables the checks that need head_dim, the base
    and an L0 already in the config; `seq_len` (the stage's packed length) the factor-vs-length checks.
    """
    if rope is None:
        return []
    if not isinstance(rope, dict):
        return [("error", f"rope: expected a mapping (got {rope!r})")]
    if "method" in rope and "rope_type" in rope:
        return [("error", "rope: give either `method` (midtrain's names) or `rope_type` (transformers'), not both")]
    issues: list[Issue] = []
    if "method" in rope:
        method = rope["method"]
        if not isinstance(method, str) or method not in METHODS:
            return [("error", f"rope.method: unknown method {method!r} (known: {', '.join(METHODS)})")]
        raw = {k: v for k, v in rope.items() if k != "method"}
        known = set(method_params(method))
        for key in raw:
            if key not in known:
                issues.append(
                    ("error", f"rope.{key}: not a parameter of method {method!r} (known: {', '.join(sorted(known))})")
                )
        raw = {k: v for k, v in raw.items() if k in known}
    else:
        method, raw, issues = _raw_to_method(rope, spec_or_config)
        if method not in METHODS:
            return issues
    params: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            params[key] = coerce_param(key, value)
        except ValueError as e:
            issues.append(("error", f"rope.{key}: {e}"))
    try:
        spec = _as_spec(spec_or_config)
    except (ValueError, AttributeError) as e:
        return [*issues, ("error", f"rope: cannot read the model's rotary setup: {e}")]
    issues += _check_method(method, params, raw, seq_len, spec, training)
    return issues


def _check_method(
    method: str,
    params: dict[str, Any],
    raw: dict[str, Any],
    seq_len: int | None,
    spec: RotarySpec | None,
    training: bool,
) -> list[Issue]:
    m = METHODS[method]
    out: list[Issue] = []
    err = lambda key, msg: out.append(("error", f"rope.{key}: {msg}"))  # noqa: E731
    warn = lambda key, msg: out.append(("warning", f"rope.{key}: {msg}"))  # noqa: E731
    for key, default in m.params.items():
        if default is REQUIRED and key not in raw:
            err(key, f"required by method {method!r}")
    if method == "abf" and "rope_theta" not in raw:
        err("rope_theta", "required by method 'abf' (the new base, e.g. 5e5)")
    factor = params.get("factor")
    if factor is not None and factor < 1:
        err("factor", f"must be >= 1 (got {factor}); a factor below 1 shrinks the context")
    if params.get("rope_theta") is not None and params["rope_theta"] <= 1:
        err("rope_theta", f"must be > 1 (got {params['rope_theta']})")
    if m.inference_only and training:
        err(
            "method",
            f"{method!r} is inference-only: it rescales from max(position_ids)+1 of each batch, and with "
            "packed documents that restart positions it trains a mix of bases; train with yarn, ntk, "
            "abf or linear and use dynamic only at evaluation",
        )
    for key in ("beta_fast", "beta_slow"):
        if key in params and params[key] is not None and params[key] <= 0:
            fallback = 32 if key == "beta_fast" else 1
            err(
                key,
                f"must be > 0 (got {params[key]}); transformers reads `{key} or {fallback}` and would silently "
                f"use {fallback}",
            )
    bf, bs = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    if method == "yarn" and bf <= bs:
        err("beta_fast", f"must be greater than beta_slow (got beta_fast={bf}, beta_slow={bs})")
    if method == "llama3":
        lf, hf = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        if lf is not None and hf is not None and (lf <= 0 or hf <= lf):
            err("high_freq_factor", f"need 0 < low_freq_factor < high_freq_factor (got {lf}, {hf})")
    if params.get("attention_factor") is not None and params["attention_factor"] <= 0:
        err("attention_factor", f"must be > 0 (got {params['attention_factor']})")
    if spec is not None and method == "longrope":
        for key in ("short_factor", "long_factor"):
            if isinstance(params.get(key), list) and len(params[key]) != spec.dim // 2:
                err(
                    key, f"needs d/2 = {spec.dim // 2} entries, one per rotated dimension pair (got {len(params[key])})"
                )
    original = params.get("original_max_position_embeddings") or (
        spec.original_max_position_embeddings if spec else None
    )
    if m.needs_original and not original:
        err(
            "original_max_position_embeddings",
            f"required by {method!r}: the pre-training length L0; without it transformers falls back to "
            "max_position_embeddings (the extended length) and the remap changes meaning",
        )
    if any(sev == "error" for sev, _ in out):
        return out

    # What the export will be (needs a spec for base / head_dim).
    exported_len = None
    if spec is not None:
        try:
            resolved, _ = resolve(method, params, spec)
            exported_len = resolved.max_position_embeddings
        except ValueError as e:
            err("method", str(e))
            return out
        if method == "yarn":
            _check_yarn_ramp(resolved, bf, bs, params.get("truncate", True), warn)
    if params.get("max_position_embeddings") is not None and factor is not None and original:
        explicit = params["max_position_embeddings"]
        if method in ("yarn", "llama3") and explicit != round(factor * original):
            warn(
                "max_position_embeddings",
                f"{method} expects factor x L0 = {round(factor * original)} (got "
                f"{explicit}); transformers warns and uses the explicit factor",
            )
        if method == "dynamic" and explicit > original:
            warn(
                "max_position_embeddings",
                f"dynamic NTK is the identity up to max_position_embeddings: at "
                f"{explicit} it leaves lengths {original}..{explicit} unscaled",
            )

    if seq_len is None or not original:
        return out
    if method == "longrope":
        if seq_len <= original:
            err(
                "original_max_position_embeddings",
                f"longrope uses long_factor only beyond L0={original}, and this stage's seq_len is {seq_len}: it "
                "would train the short factors only",
            )
        else:
            warn(
                "method",
                f"longrope picks long_factor from max(position_ids)+1 of each batch; position ids restart "
                f"per packed document, so documents shorter than L0={original} train the short factors. "
                "Make sure the stage's data has documents longer than L0",
            )
    # dynamic's factor is not an extension ratio (at n = s·L it scales the slowest dimension by s² - s + 1)
    if factor is not None and method in ("linear", "ntk", "yarn", "llama3", "longrope"):
        ratio = seq_len / original
        if not math.isclose(factor, ratio, rel_tol=1e-9):
            warn(
                "factor",
                f"factor {factor:g} extends L0={original} to {factor * original:g} tokens, but the stage "
                f"trains at seq_len {seq_len} (= {ratio:g} x L0)",
            )
    if exported_len is not None and method in ("yarn", "llama3", "longrope") and seq_len > exported_len:
        warn("factor", f"seq_len {seq_len} is beyond the extended length {exported_len}")
    return out


def _check_yarn_ramp(spec: RotarySpec, beta_fast: float, beta_slow: float, truncate: bool, warn: Any) -> None:
    original = spec.original_max_position_embeddings
    assert original is not None
    kept = original / (2 * math.pi * beta_fast)  # > 1 needed for any dimension to complete beta_fast rotations in L0
    if kept <= 1:
        low, high = yarn_correction_range(spec.dim, spec.base, original, beta_fast, beta_slow, truncate)
        warn(
            "beta_fast",
            f"at L0={original} no dimension completes beta_fast={beta_fast:g} rotations "
            f"(needs L0 > 2π·beta_fast ≈ {2 * math.pi * beta_fast:.0f}), so the ramp spans dims "
            f"{low}..{high} and YaRN interpolates almost every dimension like PI; for a short L0 scale "
            f"beta_fast down (beta_fast = L0/32 keeps wavelengths below 32 tokens, e.g. "
            f"{max(1.0, original / 32):g})",
        )


def stage_rope_issues(stages: list[Any], spec_or_config: Any = None) -> tuple[list[tuple[tuple, str]], list[str]]:
    """Every stage's RoPE problems: errors as (field path, message) for recipe errors, warnings as lines.

    `stages` are recipe stages (with `.name`, `.rope`, `.seq_len`); the field path is ("stages", i, "rope", key...).
    """
    errors: list[tuple[tuple, str]] = []
    warnings: list[str] = []
    for i, stage in enumerate(stages):
        for severity, message in validate_rope(stage.rope, stage.seq_len, spec_or_config):
            key, _, text = message.partition(": ")
            if severity == "error":
                errors.append((("stages", i, *key.split(".")), text))
            else:
                warnings.append(f"stage {stage.name!r}: {message}")
    return errors, warnings
