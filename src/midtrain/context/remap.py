"""What a stage's `rope` setting writes into a model config: the new `rope_parameters`, per layer type where the
family sets RoPE per layer type, with the model's own RoPE fields kept. Torch-free: `recipe check` computes the
same result as `apply_rope` and lets the family's config judge it before any training.

Rules (docs/ROPE.md):
- Per-layer-type RoPE (Gemma 3/4, OLMo 3): the setting remaps the layer types in its `layer_types:`, by default
  every type but the windowed ones (the global layers: Gemma 3 extended only those, x8 linear; local sliding layers
  keep their base). Each type is remapped from its own base theta and head_dim.
- Kept unless the stage sets them: fields that are no method's parameter (`llama_4_scaling_beta`,
  `partial_rotary_factor`, `mrope_section`) and the model-specific YaRN fields (`truncate`, `mscale`,
  `mscale_all_dim`) where the new method takes them. A previous method's own parameters (llama3's
  `low_freq_factor`, ...) go with it.
- Gemma 4's global layers use transformers' `proportional` RoPE (a fraction of each head rotates, over the whole
  head_dim): only `linear` (its `factor`) and `abf` (its theta) keep that meaning; other methods are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from midtrain.context.methods import METHODS, base_spec, rope_layer_parameters
from midtrain.context.setting import HF_ROPE_KEYS, RopeIssue, RopeSetting, RopeSettingError, parse_rope

# YaRN fields a family fixes for its model (gpt-oss: truncate false; DeepSeek: mscale): kept over method defaults.
MODEL_KEYS = frozenset({"truncate", "mscale", "mscale_all_dim"})
# Every key that is some method's parameter: a previous method's parameters do not survive a method change.
_METHOD_KEYS = frozenset().union(*(r | o for r, o in HF_ROPE_KEYS.values()),
                                 *(m.accepted for m in METHODS.values())) | {"type"}
_PROPORTIONAL_METHODS = ("linear", "abf")


@dataclass(frozen=True)
class Replaced:
    """A remap of the base (llama3, yarn, ...) that a method-form stage replaces rather than composes with."""

    description: str  # "llama3 (factor 8, original_max_position_embeddings 8192)"
    rope_theta: float  # the base theta the new remap is computed from
    layer_type: str | None = None  # per-layer-type RoPE: the layer type

    def __str__(self) -> str:
        return (f"{self.layer_type}: " if self.layer_type else "") + self.description


@dataclass
class Remap:
    """The result of a setting on one config: what to write, and what it replaced (for the plan's warnings)."""

    rope_parameters: dict[str, Any]
    max_position_embeddings: int | None
    # provenance (config.midtrain_rope): the method form's parameters; for a raw dict None, or on per-layer-type
    # RoPE {rope_parameters: the dict, layer_types: those it changed}
    record: dict[str, Any] | None
    layer_types: list[str] | None = None  # the layer types remapped (per-layer-type RoPE only)
    replaced: list[Replaced] = field(default_factory=list)  # each remapped base this one replaces


def default_layer_types(types: list[str]) -> list[str]:
    """The layer types an extension touches by default: the global ones (not sliding, not chunked). Empty when
    every type is windowed: the setting must then name them (`layer_types:`)."""
    return [t for t in types if "sliding" not in t and "chunk" not in t]


def remap_rope(config: Any, rope: RopeSetting | Mapping[str, Any]) -> Remap:
    """The rope_parameters `rope` gives `config` (not modified), for a setting already checked against it
    (`midtrain.context.checks.config_rope_issues`). Raises RopeSettingError naming each field, or ValueError when
    the config's rotary setup cannot be read."""
    per_type = rope_layer_parameters(config)
    if per_type is None:
        setting = _parse(rope, dict(getattr(config, "rope_parameters", None) or {}))
        if setting.layer_types is not None:
            raise RopeSettingError([RopeIssue(("rope", "layer_types"), f"{config.model_type!r} sets one RoPE for all "
                                              "layers; layer_types is for per-layer-type RoPE (Gemma 3, OLMo 3)")])
        params, max_pos, record, replaced = _remap_one(config, setting, None)
        return Remap(params, max_pos, record, None, [replaced] if replaced else [])

    setting = _parse(rope, None)
    types = list(per_type)
    touched = list(setting.layer_types) if setting.layer_types is not None else default_layer_types(types)
    unknown = [t for t in touched if t not in per_type]
    nope = [t for t in unknown if t in (config.rope_parameters or {})]
    if nope:
        raise RopeSettingError([RopeIssue(("rope", "layer_types"), f"layer type {', '.join(map(repr, nope))} of "
                                          f"this {config.model_type!r} model has no RoPE (its rope_parameters entry "
                                          f"is None); RoPE layer types: {', '.join(types)}")])
    if unknown:
        raise RopeSettingError([RopeIssue(("rope", "layer_types"), f"no layer type {', '.join(map(repr, unknown))} "
                                          f"in this {config.model_type!r} model (it has: {', '.join(types)})")])
    if not touched:
        raise RopeSettingError([RopeIssue(("rope", "layer_types"), f"every RoPE layer type of this "
                                          f"{config.model_type!r} model is windowed ({', '.join(types)}), and an "
                                          "extension touches the global ones by default: name the layer types to "
                                          "remap")])
    new = copy.deepcopy(dict(config.rope_parameters))  # every entry kept: untouched types, NoPE (None) ones
    max_pos: int | None = None
    record: dict[str, Any] | None = None
    replaced = []
    for layer_type in touched:
        typed = _parse(rope, per_type[layer_type])
        params, length, typed_record, replaced_one = _remap_one(config, typed, layer_type)
        new[layer_type] = params
        max_pos = length if max_pos is None or (length or 0) > max_pos else max_pos
        if replaced_one:
            replaced.append(replaced_one)
        if typed_record is not None:
            record = record or {**{k: v for k, v in typed_record.items() if k != "base_rope_theta"},
                                "layer_types": touched, "base_rope_theta": {}}
            record["base_rope_theta"][layer_type] = typed_record["base_rope_theta"]
    if record is None:  # a transformers dict: no method to record, but which layer types it changed
        record = {"rope_parameters": setting.to_dict(), "layer_types": touched}
    return Remap(new, max_pos, record, touched, replaced)


def _parse(rope: RopeSetting | Mapping[str, Any], current: dict[str, Any] | None) -> RopeSetting:
    setting = parse_rope(rope, current=current)
    assert setting is not None
    return setting


def _remap_one(config: Any, setting: RopeSetting, layer_type: str | None
               ) -> tuple[dict[str, Any], int | None, dict[str, Any] | None, Replaced | None]:
    """(rope_parameters, max_position_embeddings, record, what it replaced) for one rope_parameters dict."""
    old = dict(rope_layer_parameters(config)[layer_type]) if layer_type else dict(
        getattr(config, "rope_parameters", None) or {})
    spec = base_spec(config, layer_type)
    old_type = old.get("rope_type", old.get("type", "default"))
    if old_type == "proportional":
        return _remap_proportional(old, setting, spec.base, layer_type)
    if setting.form == "transformers":
        new = dict(setting.written)
        max_pos = new.pop("max_position_embeddings", None)
        new.pop("layer_types", None)
        params = dict(old)
        if new.get("rope_type", old_type) != old_type:  # another method: the old one's parameters go
            params = {k: v for k, v in old.items() if k == "rope_theta" or k not in _METHOD_KEYS}
        params.update(new)
        params.setdefault("rope_type", "default")
        params.pop("type", None)
        switched = params["rope_type"] != old_type  # the same type is merged: an edit of the base's remap
        return params, max_pos, None, _replaced(old, params, spec.base, layer_type) if switched else None
    params, max_pos = setting.rope_parameters(spec)
    accepted = set(setting.info.accepted)
    for key, value in old.items():
        if key in MODEL_KEYS and key in accepted and key not in setting.params:
            params[key] = value  # the family's own YaRN field, not the method's default
        elif key not in _METHOD_KEYS and key not in params:
            params[key] = value  # a model property (llama_4_scaling_beta, partial_rotary_factor, ...)
    if "max_position_embeddings" in old:  # Ministral 3 mirrors the model's length here: kept, at the new length
        params["max_position_embeddings"] = int(max_pos or old["max_position_embeddings"])
    record = {"method": setting.method, **setting.params, "base_rope_theta": spec.base}
    theta = float(setting.params.get("rope_theta") or spec.base)  # what it is computed from (ntk derives its own)
    return params, max_pos, record, _replaced(old, params, theta, layer_type)


def _remap_proportional(old: dict[str, Any], setting: RopeSetting, base: float, layer_type: str | None
                        ) -> tuple[dict[str, Any], int | None, dict[str, Any] | None, Replaced | None]:
    where = f"layer type {layer_type!r}" if layer_type else "this model"
    if setting.method not in _PROPORTIONAL_METHODS:
        raise RopeSettingError([RopeIssue(("rope", "method"), f"{where} uses transformers' proportional RoPE (a "
                                          f"fraction of each head rotates); midtrain extends it with "
                                          f"{' or '.join(_PROPORTIONAL_METHODS)} only (got {setting.method!r})")])
    params = dict(old)
    if setting.method == "linear":
        params["factor"] = float(setting.params["factor"])
    if setting.params.get("rope_theta") is not None:
        params["rope_theta"] = float(setting.params["rope_theta"])
    max_pos = setting.params.get("max_position_embeddings")
    record = {"method": setting.method, **setting.params, "base_rope_theta": base}
    return params, max_pos, record, None


def _replaced(old: Mapping[str, Any], new: Mapping[str, Any], theta: float, layer_type: str | None
              ) -> Replaced | None:
    """The base's own remap when the new parameters replace it (never composed with it)."""
    old_type = old.get("rope_type", old.get("type", "default"))
    if old_type in ("default", "proportional") or dict(old) == dict(new):
        return None
    detail = ", ".join(f"{k} {old[k]:g}" if isinstance(old[k], (int, float)) and not isinstance(old[k], bool)
                       else f"{k} {old[k]}" for k in ("factor", "original_max_position_embeddings") if k in old)
    return Replaced(f"{old_type}" + (f" ({detail})" if detail else ""), theta, layer_type)


def trial_rope(config: Any, rope_parameters: dict[str, Any], max_pos: int | None) -> None:
    """Raises ValueError when the model family's config refuses these rope_parameters (phi3 takes only longrope)."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope_parameters)
    if max_pos is not None:
        trial.max_position_embeddings = int(max_pos)
    if hasattr(trial, "validate_rope"):
        try:
            trial.validate_rope()
        except (KeyError, ValueError) as e:
            raise ValueError(f"invalid rope setting for a {config.model_type!r} model: {e}") from None


def has_rotary(config: Any) -> bool:
    """Whether the model has rotary position embeddings at all (GPT-2 learns absolute positions instead)."""
    return bool(getattr(config, "rope_parameters", None)) or getattr(config, "rope_theta", None) is not None


__all__ = ["MODEL_KEYS", "Remap", "Replaced", "default_layer_types", "has_rotary", "remap_rope", "trial_rope"]
