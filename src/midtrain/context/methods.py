"""The RoPE method table, torch-free: names, parameters, coercion, traits, and the export to transformers' form.

This is the one home of what a remapping *is* (which parameters it takes and how it exports); the frequency
computations that need torch live in `midtrain.context.rope`, the parsing of a stage's `rope:` in
`midtrain.context.setting`. Nothing here imports torch, so a recipe is checkable without the training stack.

Traits say how methods differ where callers used to branch on names:
- `needs_original`: reads L0 (original_max_position_embeddings).
- `length`: the max_position_embeddings it exports: "kept" (not read), "scaled" (s·L0 when a factor is given;
  transformers expects that), "original" (L0: dynamic NTK rescales only beyond it).
- `switches_at`: picks its frequencies from max(position_ids)+1 of the batch, changing at L0 ("original",
  longrope) or at max_position_embeddings ("max_position", dynamic).
- `inference_only`, `derives_theta` (exports as default with a theta derived from the factor: ntk), and
  `factor_is_extension` (the factor is target length / L0; not dynamic's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, kw_only=True)
class RotarySpec:
    """What a remapping needs to know about a model's rotary embedding.

    `original_max_position_embeddings` (L0) is the pre-training length; None when the config does not say it
    (a default-RoPE base model's `max_position_embeddings` is *usually* L0, but midtrain never guesses it).
    `max_position_embeddings` (L) is the length the config declares (the target after an extension).
    """

    head_dim: int
    base: float
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0

    @property
    def dim(self) -> int:
        """Rotated dimensions d (transformers: int(head_dim · partial_rotary_factor)); inv_freq has d/2 entries."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_config(cls, config: Any, layer_type: str | None = None) -> RotarySpec:
        """Read a (transformers 5.x) config the way `modeling_rope_utils` reads it. A config with per-layer-type
        rope_parameters (Gemma 3/4, OLMo 3) is read for one `layer_type`, with that type's own head_dim where the
        family has per-layer shapes (Gemma 4's `per_layer_config`)."""
        per_type = rope_layer_parameters(config)
        shapes = config
        if per_type is not None:
            if layer_type is None:
                raise ValueError(f"per-layer-type rope_parameters ({', '.join(per_type)}): name the layer type")
            if layer_type not in per_type:
                raise ValueError(f"no layer type {layer_type!r} in rope_parameters (has: {', '.join(per_type)})")
            rp = dict(per_type[layer_type])
            try:
                shapes = config.per_layer_config[layer_type]
            except (AttributeError, KeyError, TypeError, ValueError):
                shapes = config
        else:
            rp = dict(getattr(config, "rope_parameters", None) or {})
        base = rp.get("rope_theta") or getattr(config, "rope_theta", None) or getattr(config, "default_theta", 1e4)
        prf = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        head_dim = getattr(shapes, "head_dim", None) or shapes.hidden_size // shapes.num_attention_heads
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        original = rp.get("original_max_position_embeddings")
        if rope_type in _TYPES_READING_ORIGINAL and getattr(config, "original_max_position_embeddings", None):
            original = config.original_max_position_embeddings  # transformers gives the top-level field priority
        return cls(
            head_dim=int(head_dim),
            base=float(base),
            original_max_position_embeddings=int(original) if original else None,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            partial_rotary_factor=1.0 if prf is None else float(prf),
        )


RECORD = "midtrain_rope"  # config attribute recording the last method-form remap (saved in config.json)


def rope_layer_parameters(config: Any) -> dict[str, dict[str, Any]] | None:
    """{layer type: rope_parameters} of a config whose RoPE is set per layer type (Gemma 3/4: local sliding
    layers at theta 10k, global ones their own), else None.

    Nested the way transformers reads it (`nested_rope_parameter_keys`): the keys that name one of the config's
    layer types (or its `_rope_type_labels`, DeepSeek-V4's main/compress). Only those with a dict are returned: a
    type set to None has no RoPE (NoPE layers), and an entry no layer uses (a Gemma 3 config whose few layers are
    all sliding still carries `full_attention`) is not read by the model."""
    rp = getattr(config, "rope_parameters", None) or {}
    if not isinstance(rp, Mapping):
        return None
    labels = set(getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ())
    nested = [k for k in rp if k in labels]
    if not nested:
        return None
    return {k: dict(rp[k]) for k in nested if isinstance(rp[k], Mapping)}


def base_spec(config: Any, layer_type: str | None = None) -> RotarySpec:
    """The spec a new remap starts from: the config's, except that a derived theta does not compound.

    A method-form remap records itself in `config.midtrain_rope`. A method that `derives_theta` (ntk) derives it
    from the factor, so a later stage (or the same setting repeated on a continued model) starts from the theta
    before it; a theta chosen by `abf` or given as `rope_theta` is the model's base from then on.
    """
    spec = RotarySpec.from_config(config, layer_type)
    record = getattr(config, RECORD, None)
    name = record.get("method") if isinstance(record, dict) else None
    method = METHODS.get(name) if isinstance(name, str) else None
    base = record.get("base_rope_theta") if method is not None else None
    if isinstance(base, dict):  # per layer type
        touched = layer_type in (record.get("layer_types") or ())
        base = base.get(layer_type) if touched else None
    if method is not None and method.derives_theta and base:
        spec = RotarySpec(
            head_dim=spec.head_dim,
            base=float(base),
            original_max_position_embeddings=spec.original_max_position_embeddings,
            max_position_embeddings=spec.max_position_embeddings,
            partial_rotary_factor=spec.partial_rotary_factor,
        )
    return spec


# ------------------------------------------------------------------------------------------------- the table
REQUIRED = object()  # marks a required parameter in `MethodInfo.params`

#: Keys every method accepts besides its own: a base override, the pre-training length and an explicit export length.
COMMON_PARAMS = ("rope_theta", "original_max_position_embeddings", "max_position_embeddings")


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """One remapping: its parameters (name -> default; `REQUIRED` marks required ones), export type and traits."""

    name: str
    params: Mapping[str, Any]
    rope_type: str  # how it exports (transformers' rope_type)
    summary: str = ""
    needs_original: bool = False
    length: Literal["kept", "scaled", "original"] = "kept"
    switches_at: Literal["original", "max_position"] | None = None
    inference_only: bool = False
    derives_theta: bool = False
    factor_is_extension: bool = False
    hints: Mapping[str, str] = field(default_factory=dict)  # what a required parameter means, for its error

    @property
    def has_factor(self) -> bool:
        return "factor" in self.params

    @property
    def seq_len_dependent(self) -> bool:
        """Picks its frequencies from max(position_ids)+1 of each batch (longrope, dynamic)."""
        return self.switches_at is not None

    @property
    def reads_length(self) -> bool:
        """Whether the exported max_position_embeddings is the method's own (not the base's, unread)."""
        return self.length != "kept"

    @property
    def expects_scaled_length(self) -> bool:
        """transformers expects max_position_embeddings = s·L0 (yarn, llama3); longrope's optional factor instead
        defaults to L/L0, so any length is consistent there."""
        return self.length == "scaled" and "factor" in self.required

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.params.items() if v is REQUIRED)

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every key a `rope` mapping with this method may hold (besides `method`)."""
        return tuple(dict.fromkeys([*self.params, *COMMON_PARAMS]))


def _info(name: str, params: Mapping[str, Any], rope_type: str, **traits: Any) -> tuple[str, MethodInfo]:
    return name, MethodInfo(name=name, params=params, rope_type=rope_type, **traits)


METHODS: dict[str, MethodInfo] = dict([
    _info("default", {}, "default", summary="inv_j = base^(-2j/d)"),
    _info("abf", {"rope_theta": REQUIRED}, "default", summary="default with a chosen base'",
          hints={"rope_theta": "the new base, e.g. 5e5"}),
    _info("linear", {"factor": REQUIRED}, "linear", summary="PI: inv_j / s", factor_is_extension=True),
    _info("ntk", {"factor": REQUIRED}, "default", summary="base' = base·s^(d/(d-2))", derives_theta=True,
          factor_is_extension=True),
    _info("dynamic", {"factor": REQUIRED}, "dynamic", length="original", switches_at="max_position",
          inference_only=True, summary="base' = base·(s·n/L - (s-1))^(d/(d-2)), n = max(seq_len, L)"),
    _info("yarn", {"factor": REQUIRED, "beta_fast": 32, "beta_slow": 1, "truncate": True, "mscale": None,
                   "mscale_all_dim": None, "attention_factor": None},
          "yarn", needs_original=True, length="scaled", factor_is_extension=True,
          summary="ramp between extrapolation and PI; alpha = 0.1 ln s + 1"),
    _info("llama3", {"factor": REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
          "llama3", needs_original=True, length="scaled", factor_is_extension=True,
          summary="wavelength bands: keep / smooth / PI"),
    _info("longrope", {"short_factor": REQUIRED, "long_factor": REQUIRED, "factor": None, "attention_factor": None},
          "longrope", needs_original=True, length="scaled", switches_at="original", factor_is_extension=True,
          summary="per-dimension lambda (short/long); alpha = sqrt(1 + ln s / ln L0)"),
])

_TYPES_READING_ORIGINAL = frozenset(m.rope_type for m in METHODS.values() if m.needs_original)


def method_info(name: Any) -> MethodInfo:
    """The table entry of `name`; ValueError naming the known methods."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown RoPE method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def method_params(method: str) -> tuple[str, ...]:
    """Every key a `rope` mapping with this method may hold (besides `method`)."""
    return method_info(method).accepted


# -------------------------------------------------------------------------------------------------- coercion
_FLOAT_PARAMS = frozenset({"rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                           "attention_factor", "low_freq_factor", "high_freq_factor"})
_INT_PARAMS = frozenset({"original_max_position_embeddings", "max_position_embeddings"})
_LIST_PARAMS = frozenset({"short_factor", "long_factor"})  # one entry per rotated dimension pair (d/2)


def _beta_rule(key: str, fallback: int) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > 0,
            f"must be > 0 (got {{v}}); transformers reads `{key} or {fallback}` and would silently use {fallback}")


#: Value rules of single parameters (after coercion): (holds, message with {v}).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "factor": (lambda v: v >= 1, "must be >= 1 (got {v}); a factor below 1 shrinks the context"),
    "rope_theta": (lambda v: v > 1, "must be > 1 (got {v})"),
    "beta_fast": _beta_rule("beta_fast", 32),
    "beta_slow": _beta_rule("beta_slow", 1),
    "attention_factor": (lambda v: v > 0, "must be > 0 (got {v})"),
}


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))  # a huge int overflows float: not a usable number either
    except OverflowError:
        return False


#: Rules between two parameters of a method that has both (defaults filled in): (a, b, holds, key, message).
PAIR_RULES: tuple[tuple[str, str, Callable[[Any, Any], bool], str, str], ...] = (
    ("beta_fast", "beta_slow", lambda a, b: a > b, "beta_fast",
     "must be greater than beta_slow (got beta_fast={a}, beta_slow={b})"),
    ("low_freq_factor", "high_freq_factor", lambda a, b: 0 < a < b, "high_freq_factor",
     "need 0 < low_freq_factor < high_freq_factor (got {a}, {b})"),
)


def coerce_param(key: str, value: Any) -> Any:
    """A parameter value in its type, checked against its rule; numeric strings are accepted because YAML reads
    `5e5` as a string. Raises ValueError saying what was expected."""
    if value is None:
        return None
    if key in _FLOAT_PARAMS or key in _INT_PARAMS:
        if isinstance(value, bool):
            raise ValueError(f"expected a number (got {value!r})")
        if isinstance(value, str):
            try:
                value = float(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected a number (got {value!r})") from None
        if not isinstance(value, (int, float)) or not _finite(value):
            raise ValueError(f"expected a number (got {value!r})")
        if key in _INT_PARAMS:
            if value != int(value) or value <= 0:
                raise ValueError(f"expected a positive integer (got {value!r})")
            return int(value)
        rule = _RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ValueError(rule[1].format(v=value))
        return value  # kept as given (4 stays 4, 4.0 stays 4.0): the export then reads like the recipe
    if key == "truncate":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false (got {value!r})")
        return value
    if key in _LIST_PARAMS:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"expected a list of numbers (got {value!r})")
        out = []
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not _finite(x) or not x > 0:
                raise ValueError(f"expected a list of positive numbers (got {x!r} in it)")
            out.append(float(x))
        return out
    return value


def normalize_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` (without `method`) with values coerced; ValueError naming the first unknown or ill-typed key."""
    known = set(method_params(method))
    out = {}
    for key, value in params.items():
        if key == "method":
            continue
        if key not in known:
            raise ValueError(f"{method}: unknown parameter {key!r} (known: {', '.join(sorted(known))})")
        try:
            out[key] = coerce_param(key, value)
        except ValueError as e:
            raise ValueError(f"{method}: parameter {key!r}: {e}") from None
    return out


# ------------------------------------------------------------------------------------- torch-free method math
def ntk_base(base: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: base · s^(d/(d-2)) (the theta `ntk` exports)."""
    return base * factor ** (dim / (dim - 2))


def yarn_mscale(scale: float, mscale: float = 1) -> float:
    """g(s, m) = 0.1 · m · ln s + 1 (1 for s <= 1): YaRN's attention temperature."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(
    factor: float,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
) -> float:
    """Explicit value, else g(s, mscale)/g(s, mscale_all_dim) when both are set (and non-zero), else g(s)."""
    if attention_factor is not None:
        return attention_factor
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_correction_range(
    dim: int, base: float, original: int, beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True
) -> tuple[float, float]:
    """(lo, hi) dimension bounds of the ramp: r(β) = d·ln(L0/(2πβ)) / (2 ln base), floor/ceil, clamped to [0, d-1]."""

    def r(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = r(beta_fast), r(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def betas(beta_fast: float | None, beta_slow: float | None) -> tuple[float, float]:
    """(beta_fast, beta_slow) with YaRN's defaults 32 and 1. transformers reads `beta_fast or 32`: an explicit 0
    would silently become 32, so it is refused instead."""
    if beta_fast is not None and beta_fast <= 0:
        raise ValueError(f"yarn: beta_fast must be > 0 (got {beta_fast}; transformers would silently use 32)")
    if beta_slow is not None and beta_slow <= 0:
        raise ValueError(f"yarn: beta_slow must be > 0 (got {beta_slow}; transformers would silently use 1)")
    return beta_fast or 32, beta_slow or 1


def longrope_attention_factor(factor: float, original: int, attention_factor: float | None = None) -> float:
    """Explicit value, else sqrt(1 + ln s / ln L0) (1 for s <= 1)."""
    if attention_factor is not None:
        return attention_factor
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


# ---------------------------------------------------------------------------------------------------- export
def resolve(method: str, params: Mapping[str, Any], spec: RotarySpec) -> tuple[RotarySpec, dict[str, Any]]:
    """The spec the exported model will compute with (base, L0, L) and the method's keyword arguments.

    Raises ValueError naming the key for unknown or missing parameters.
    """
    m = method_info(method)
    params = normalize_params(method, params)
    for key in m.required:
        if params.get(key) is None:
            raise ValueError(f"{method}: parameter {key!r} is required")
    base = float(params["rope_theta"]) if params.get("rope_theta") is not None else spec.base
    original = params.get("original_max_position_embeddings") or spec.original_max_position_embeddings
    if m.needs_original and not original:
        raise ValueError(
            f"{method}: original_max_position_embeddings (the pre-training length L0) is required; without it "
            "transformers falls back to max_position_embeddings, the extended length"
        )
    factor = params.get("factor")
    if params.get("max_position_embeddings") is not None:
        length = int(params["max_position_embeddings"])
    elif m.length == "scaled" and factor is not None:
        length = int(round(factor * original))  # transformers expects max_position_embeddings = s · L0
    elif m.length == "original":
        # Dynamic NTK scales against max_position_embeddings itself and is the identity up to it: export the
        # pre-training length there (L0 when known), or the model keeps its pre-training frequencies up to the target.
        length = int(original or spec.max_position_embeddings)
    else:
        length = spec.max_position_embeddings  # the method does not read it (or longrope without a factor)
    resolved = RotarySpec(
        head_dim=spec.head_dim,
        base=base,
        original_max_position_embeddings=int(original) if original else None,
        max_position_embeddings=length,
        partial_rotary_factor=spec.partial_rotary_factor,
    )
    kwargs = {k: params[k] for k in m.params if params.get(k) is not None}
    if "rope_theta" in m.params:  # abf: its own parameter is the base
        kwargs["rope_theta"] = base
    return resolved, kwargs


def _export_value(key: str, value: Any) -> Any:
    if key == "attention_factor":
        return float(value)  # transformers warns on an int
    if key in _LIST_PARAMS:
        return [float(x) for x in value]
    if key == "truncate":
        return bool(value)
    return value


def to_rope_parameters(method: str, params: Mapping[str, Any], spec: RotarySpec) -> tuple[dict[str, Any], int | None]:
    """(transformers-5 `rope_parameters`, `max_position_embeddings`) that make an HF model compute `method`.

    Methods exporting as transformers' default computation (default / abf / ntk) write `rope_type: default` and the
    (new or derived) `rope_theta` only; the others keep `rope_theta`, write L0 and their parameters, a defaulted
    parameter with its default (beta_fast 32, truncate true, ...). `max_position_embeddings` follows the
    method's `length` trait (see `resolve`); an explicit `max_position_embeddings` parameter wins.
    """
    m = method_info(method)
    resolved, kwargs = resolve(method, params, spec)
    base, original = resolved.base, resolved.original_max_position_embeddings
    if "beta_fast" in m.params:
        betas(kwargs.get("beta_fast"), kwargs.get("beta_slow"))  # refuse 0 (transformers would read `or 32`)
    theta = ntk_base(base, kwargs["factor"], spec.dim) if m.derives_theta else base
    out: dict[str, Any] = {"rope_type": m.rope_type, "rope_theta": theta}
    if m.rope_type != "default":
        for key, default in m.params.items():
            value = kwargs.get(key, None if default is REQUIRED else default)
            if value is not None:
                out[key] = _export_value(key, value)
        if m.needs_original:
            out["original_max_position_embeddings"] = original
    if spec.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = spec.partial_rotary_factor  # replacing the dict must not drop it
    return out, resolved.max_position_embeddings
