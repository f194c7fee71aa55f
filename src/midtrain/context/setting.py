"""A stage's `rope:` parsed once into a typed `RopeSetting`; problems as `RopeIssue`s with tuple field paths.

Two forms are accepted: midtrain's method form (`{method: yarn, factor: 4, original_max_position_embeddings: 256}`)
and a raw transformers dict (`{rope_type: yarn, ...}`, merged into the model's current `rope_parameters`, so its
meaning depends on them: `parse_rope(..., current=...)`, `RopeSetting.against`). `parse_rope` checks what the
setting says on its own (keys, types, value rules, required parameters); `midtrain.context.checks` what depends on
the stage (training, seq_len) and on the base model (head_dim, L0). Torch-free: config/ parses recipes with it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from midtrain.context.methods import (
    METHODS,
    PAIR_RULES,
    MethodInfo,
    RotarySpec,
    coerce_param,
    to_rope_parameters,
)

Path = tuple[str | int, ...]

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
        frozenset({"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                   "rope_theta"}),
        frozenset(),
    ),
}
# Keys a raw dict may carry whatever its type: kept model properties and apply_rope's explicit length.
HF_ANY_TYPE = frozenset({"partial_rotary_factor", "mrope_section", "max_position_embeddings"})


@dataclass(frozen=True)
class RopeIssue:
    """One problem of a rope setting: the field path it is about (`("rope", "factor")`, or under a recipe
    `("stages", 1, "rope", "factor")`), what is wrong, and whether it stops the run."""

    path: Path
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{'.'.join(str(p) for p in self.path)}: {self.message}"

    def under(self, *prefix: str | int) -> RopeIssue:
        """The same issue with its path below `prefix` (e.g. a stage's)."""
        return RopeIssue((*prefix, *self.path), self.message, self.severity)


class RopeSettingError(ValueError):
    """A rope setting that cannot be used; `issues` name each field."""

    def __init__(self, issues: list[RopeIssue]):
        self.issues = issues
        super().__init__("invalid rope setting: " + "; ".join(str(i) for i in issues))

    def __reduce__(self) -> tuple[type, tuple[list[RopeIssue]]]:
        return type(self), (self.issues,)  # picklable (e.g. raised in a worker process)


@dataclass(frozen=True, eq=False)
class RopeSetting(Mapping[str, Any]):
    """A parsed `rope:` setting.

    `method` is the midtrain method it amounts to (a transformers dict: its rope_type's, `abf` for a default type
    with a new theta), `params` its parameters coerced (numbers, lists, ints), `info` the method's table entry with
    its traits. As a Mapping it reads like the recipe's own mapping, *as written* (`setting["rope_theta"]` may be
    the string "4e4"; `setting.params["rope_theta"]` is 40000.0): that is what `to_dict` and the recipe dump write
    back, so run dirs and fingerprints do not change. An empty mapping parses to a setting that changes nothing
    (it is falsy).
    """

    method: str
    params: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)
    form: Literal["method", "transformers"] = "method"
    written: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the written keys, coerced
    # per-layer-type RoPE (Gemma 3/4, OLMo 3): the layer types the remap touches; None = the default (global layers)
    layer_types: tuple[str, ...] | None = None

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.method]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RopeSetting):
            return dict(self.raw) == dict(other.raw)
        if isinstance(other, Mapping):
            return dict(self.raw) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(repr(sorted((str(k), repr(v)) for k, v in self.raw.items())))

    def to_dict(self) -> dict[str, Any]:
        """The setting as the recipe wrote it (a fresh copy)."""
        return copy.deepcopy(dict(self.raw))

    def against(self, current: Mapping[str, Any] | None) -> RopeSetting:
        """What this setting amounts to on a model whose `rope_parameters` are `current`: a transformers dict merges
        into them (same rope_type) or replaces them; a method form does not depend on them. Raises
        RopeSettingError when the merge is not a usable setting."""
        if self.form == "method":
            return self
        return parse_rope(self.raw, current=current)

    def rope_parameters(self, spec: RotarySpec) -> tuple[dict[str, Any], int | None]:
        """(transformers `rope_parameters`, `max_position_embeddings`) of a method form on a model with `spec`."""
        return to_rope_parameters(self.method, self.params, spec)


# ------------------------------------------------------------------------------------------------------ parsing
def parse_rope(raw: Any, path: Path = ("rope",), *, current: Mapping[str, Any] | None = None) -> RopeSetting | None:
    """`raw` (a stage's `rope:` value, or a RopeSetting) parsed; None for None. Raises RopeSettingError listing
    every problem with its field path under `path`. `current`: the model's rope_parameters a transformers dict
    merges into (default: a plain default-RoPE base)."""
    if raw is None:
        return None
    if isinstance(raw, RopeSetting):
        return raw.against(current) if current is not None else raw
    setting, issues = parse_rope_issues(raw, path, current=current)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise RopeSettingError(errors)
    assert setting is not None
    return setting


def parse_rope_issues(
    raw: Any, path: Path = ("rope",), *, current: Mapping[str, Any] | None = None
) -> tuple[RopeSetting | None, list[RopeIssue]]:
    """Like `parse_rope` but never raises: (the setting with bad keys left out, or None when there is no method to
    speak of, and the issues found). Lets a checker report every problem at once."""
    if raw is None:
        return None, []
    if isinstance(raw, RopeSetting):
        raw = raw.raw
    if not isinstance(raw, Mapping):
        return None, [RopeIssue(path, f"expected a mapping (got {raw!r})")]
    if "method" in raw and "rope_type" in raw:
        both = "give either `method` (midtrain's names) or `rope_type` (transformers'), not both"
        return None, [RopeIssue(path, both)]
    issues: list[RopeIssue] = []
    layer_types = _layer_types(raw.get("layer_types", None), (*path, "layer_types"), issues)
    full_raw, raw = raw, {k: v for k, v in raw.items() if k != "layer_types"}
    if "method" in raw:
        form = "method"
        method = raw["method"]
        if not isinstance(method, str) or method not in METHODS:
            return None, [RopeIssue((*path, "method"), f"unknown method {method!r} (known: {', '.join(METHODS)})")]
        known = set(METHODS[method].accepted)
        present = {}
        for key, value in raw.items():
            if key == "method":
                continue
            if key in known:
                present[key] = value
            else:
                issues.append(RopeIssue((*path, key), f"not a parameter of method {method!r} "
                                                       f"(known: {', '.join(sorted(known))})"))
    else:
        form = "transformers"
        found = _transformers_form(raw, path, dict(current or {}), issues)
        if found is None:
            return None, issues
        method, present = found
    params: dict[str, Any] = {}
    for key, value in present.items():
        try:
            params[key] = coerce_param(key, value)
        except ValueError as e:
            issues.append(RopeIssue((*path, key), str(e)))
    info = METHODS[method]
    for key in info.required:
        if present.get(key) is None:
            hint = info.hints.get(key)
            issues.append(RopeIssue((*path, key), f"required by method {method!r}" + (f" ({hint})" if hint else "")))
    for a, b, holds, key, message in PAIR_RULES:
        if a in info.params and b in info.params:
            va = params[a] if params.get(a) is not None else info.params[a]
            vb = params[b] if params.get(b) is not None else info.params[b]
            if va is not None and vb is not None and not holds(va, vb):
                issues.append(RopeIssue((*path, key), message.format(a=va, b=vb)))
    written = {}
    for key, value in raw.items():
        try:
            written[key] = coerce_param(key, value)
        except ValueError:
            continue  # reported above
    setting = RopeSetting(method=method, params=params, raw=copy.deepcopy(dict(full_raw)), form=form, written=written,
                          layer_types=layer_types)
    return setting, issues


def _layer_types(value: Any, path: Path, issues: list[RopeIssue]) -> tuple[str, ...] | None:
    """`layer_types:` of a setting: a non-empty list of layer-type names (checked against the model later)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(t, str) and t for t in value):
        issues.append(RopeIssue(path, f"expected a list of layer types, e.g. [full_attention] (got {value!r})"))
        return None
    return tuple(dict.fromkeys(value))


def _transformers_form(
    raw: Mapping[str, Any], path: Path, current: dict[str, Any], issues: list[RopeIssue]
) -> tuple[str, dict[str, Any]] | None:
    """(method, parameters as written) of a raw transformers dict after apply_rope's merge into `current`."""
    rope_type = raw.get("rope_type", current.get("rope_type", "default"))
    if not isinstance(rope_type, str) or rope_type not in HF_ROPE_KEYS:
        issues.append(RopeIssue((*path, "rope_type"), f"unknown transformers rope_type {rope_type!r} "
                                f"(known: {', '.join(HF_ROPE_KEYS)}; or use method: {', '.join(METHODS)})"))
        return None
    required, optional = HF_ROPE_KEYS[rope_type]
    for key in raw:
        if key not in required | optional | HF_ANY_TYPE:
            known = ", ".join(sorted((required | optional) - {"rope_type"}))
            issues.append(RopeIssue((*path, key), f"not a parameter of rope_type {rope_type!r} (known: {known})"))
    merged = dict(current) if rope_type == current.get("rope_type", "default") else {}
    merged.update(raw)
    merged.pop("rope_type", None)
    params = {k: v for k, v in merged.items() if k in required | optional}
    if rope_type == "default":
        method = "abf" if "rope_theta" in raw else "default"
        if method == "default":
            params.pop("rope_theta", None)
    else:
        method = rope_type
    if "max_position_embeddings" in raw:
        params["max_position_embeddings"] = raw["max_position_embeddings"]
    return method, params
