"""RoPE frequency remapping: every long-context method as one function of a `RotarySpec`.

Each method returns ``(inv_freq, attention_factor)``: the float32 inverse frequencies of the d/2 rotated dimension
pairs (d = int(head_dim · partial_rotary_factor)) and the factor transformers multiplies cos and sin by (so attention
logits scale by its square). The computations follow transformers 5.x `modeling_rope_utils.py` operation by operation,
so `torch.equal` holds against `ROPE_INIT_FUNCTIONS[rope_type]` (REFERENCE §4, tests/context/test_rope_parity.py).

Methods are written in midtrain's recipe form ``{method: yarn, factor: 4, original_max_position_embeddings: 256}``
and exported in transformers' form by `to_rope_parameters`; docs/ROPE.md has the formulas and the pitfalls.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Rope = tuple[torch.Tensor, float]


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
    def from_config(cls, config: Any) -> RotarySpec:
        """Read a (transformers 5.x) config the way `modeling_rope_utils` reads it."""
        rp = dict(getattr(config, "rope_parameters", None) or {})
        labels = getattr(config, "layer_types", None) or ()
        if any(k in labels for k in rp):
            raise ValueError("per-layer-type rope_parameters are not supported by midtrain's RoPE remapping")
        base = rp.get("rope_theta") or getattr(config, "rope_theta", None) or getattr(config, "default_theta", 1e4)
        prf = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        original = rp.get("original_max_position_embeddings")
        if rope_type in ("llama3", "yarn", "longrope") and getattr(config, "original_max_position_embeddings", None):
            original = config.original_max_position_embeddings  # transformers gives the top-level field priority
        return cls(
            head_dim=int(head_dim),
            base=float(base),
            original_max_position_embeddings=int(original) if original else None,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            partial_rotary_factor=1.0 if prf is None else float(prf),
        )


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    # transformers' default computation: int64 arange cast to float32, divided by dim, base ** that, reciprocal.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _need(value: Any, what: str, method: str) -> Any:
    if value is None:
        raise ValueError(f"{method}: {what} is required")
    return value


# --------------------------------------------------------------------------------------------------- the methods
def default(spec: RotarySpec, *, seq_len: int | None = None) -> Rope:
    """Plain RoPE: inv_j = base^(-2j/d)."""
    return _default_inv_freq(spec.dim, spec.base), 1.0


def abf(spec: RotarySpec, *, rope_theta: float, seq_len: int | None = None) -> Rope:
    """Adjusted base frequency: the default computation with a chosen base (e.g. 1e4 -> 5e5)."""
    return _default_inv_freq(spec.dim, float(rope_theta)), 1.0


def linear(spec: RotarySpec, *, factor: float, seq_len: int | None = None) -> Rope:
    """Position interpolation (PI): inv_j / s."""
    inv_freq = _default_inv_freq(spec.dim, spec.base)
    inv_freq /= factor
    return inv_freq, 1.0


def ntk_base(base: float, factor: float, dim: int) -> float:
    """Static NTK-aware base: base · s^(d/(d-2)) (the theta `ntk` exports)."""
    return base * factor ** (dim / (dim - 2))


def ntk(spec: RotarySpec, *, factor: float, seq_len: int | None = None) -> Rope:
    """Static NTK-aware scaling: the default computation with base' = base · s^(d/(d-2))."""
    return _default_inv_freq(spec.dim, ntk_base(spec.base, factor, spec.dim)), 1.0


def dynamic(spec: RotarySpec, *, factor: float, seq_len: int | torch.Tensor | None = None) -> Rope:
    """Dynamic NTK: n = max(seq_len, L); base' = base · (s·n/L - (s-1))^(d/(d-2)). Identity up to n = L.

    A python `seq_len` follows `ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=int)` (double-precision base); a
    tensor follows the rotary module's forward, which passes `max(position_ids) + 1` as a tensor, so the base is
    computed in float32 there and differs in the last bits from the python path.
    """
    L = _need(spec.max_position_embeddings, "max_position_embeddings (the length dynamic NTK scales beyond)", "dynamic")
    dim = spec.dim
    if seq_len is None:
        n: Any = L
    elif isinstance(seq_len, torch.Tensor):
        n = torch.maximum(seq_len, torch.tensor(L, dtype=seq_len.dtype, device=seq_len.device))
    else:
        n = max(seq_len, L)
    base = spec.base * ((factor * n / L) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv_freq, 1.0


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


def yarn_extrapolation(spec: RotarySpec, **params: Any) -> torch.Tensor:
    """e_j in [0, 1]: 1 keeps dimension j as in pre-training, 0 interpolates it fully (divides by s)."""
    original = _need(spec.original_max_position_embeddings, "original_max_position_embeddings", "yarn")
    beta_fast, beta_slow = _betas(params.get("beta_fast"), params.get("beta_slow"))
    low, high = yarn_correction_range(spec.dim, spec.base, original, beta_fast, beta_slow, params.get("truncate", True))
    if low == high:
        high += 0.001  # transformers: prevent a zero-width ramp
    ramp = torch.clamp((torch.arange(spec.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return 1 - ramp


def _betas(beta_fast: float | None, beta_slow: float | None) -> tuple[float, float]:
    # transformers reads `beta_fast or 32`: an explicit 0 would silently become 32. Refuse it instead.
    if beta_fast is not None and beta_fast <= 0:
        raise ValueError(f"yarn: beta_fast must be > 0 (got {beta_fast}; transformers would silently use 32)")
    if beta_slow is not None and beta_slow <= 0:
        raise ValueError(f"yarn: beta_slow must be > 0 (got {beta_slow}; transformers would silently use 1)")
    return beta_fast or 32, beta_slow or 1


def yarn(
    spec: RotarySpec,
    *,
    factor: float,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    truncate: bool = True,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> Rope:
    """YaRN: per-dimension blend of extrapolation (fast dims) and PI (slow dims) over a linear ramp, plus g(s)."""
    dim = spec.dim
    attn = yarn_attention_factor(factor, mscale, mscale_all_dim, attention_factor)
    pos_freqs = spec.base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)  # not extrapolation / s: torch.equal would fail
    extrapolation = yarn_extrapolation(spec, beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate).to(
        dtype=torch.float
    )
    inv_freq = inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation
    return inv_freq, attn


def llama3(
    spec: RotarySpec,
    *,
    factor: float,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    seq_len: int | None = None,
) -> Rope:
    """Llama 3.1: wavelengths > L0/low_freq_factor divided by s, < L0/high_freq_factor kept, smooth in between."""
    original = _need(spec.original_max_position_embeddings, "original_max_position_embeddings", "llama3")
    inv_freq = _default_inv_freq(spec.dim, spec.base)
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


def longrope_attention_factor(factor: float, original: int, attention_factor: float | None = None) -> float:
    """Explicit value, else sqrt(1 + ln s / ln L0) (1 for s <= 1)."""
    if attention_factor is not None:
        return attention_factor
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def longrope(
    spec: RotarySpec,
    *,
    short_factor: Sequence[float],
    long_factor: Sequence[float],
    factor: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> Rope:
    """LongRoPE: inv_j = 1/(λ_j · base^(2j/d)), λ = long_factor when seq_len > L0 else short_factor.

    `factor` defaults to L/L0 (max_position_embeddings / original). The attention factor does not depend on
    seq_len: transformers applies it to short inputs too.
    """
    original = _need(spec.original_max_position_embeddings, "original_max_position_embeddings", "longrope")
    if factor is None:
        factor = _need(spec.max_position_embeddings, "factor (or max_position_embeddings)", "longrope") / original
    attn = longrope_attention_factor(factor, original, attention_factor)
    lam = long_factor if seq_len and seq_len > original else short_factor
    if len(lam) != spec.dim // 2:
        raise ValueError(f"longrope: factor lists need d/2 = {spec.dim // 2} entries (got {len(lam)})")
    ext_factors = torch.tensor(lam, dtype=torch.float32)
    inv_freq_shape = torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim
    return 1.0 / (ext_factors * spec.base**inv_freq_shape), attn


def longrope_initial_factors(
    spec: RotarySpec, factor: float, beta_fast: float = 32, beta_slow: float = 1
) -> list[float]:
    """LongRoPE search's starting point: λ_j = inv_default / inv_yarn (1 for kept dims, s for interpolated ones)."""
    base_inv, _ = default(spec)
    yarn_inv, _ = yarn(spec, factor=factor, beta_fast=beta_fast, beta_slow=beta_slow)
    return [float(x) for x in (base_inv.double() / yarn_inv.double())]


# ------------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Method:
    """One remapping: its function, its parameters (name -> default; `REQUIRED` marks required ones) and traits."""

    fn: Callable[..., Rope]
    params: Mapping[str, Any]
    rope_type: str  # how it exports (transformers' rope_type)
    needs_original: bool = False  # reads L0
    seq_len_dependent: bool = False  # picks frequencies from max(position_ids) + 1 of the batch
    inference_only: bool = False
    summary: str = ""


REQUIRED = object()

#: Keys every method accepts besides its own: a base override, the pre-training length and an explicit export length.
COMMON_PARAMS = ("rope_theta", "original_max_position_embeddings", "max_position_embeddings")

METHODS: dict[str, Method] = {
    "default": Method(default, {}, "default", summary="inv_j = base^(-2j/d)"),
    "abf": Method(abf, {"rope_theta": REQUIRED}, "default", summary="default with a chosen base'"),
    "linear": Method(linear, {"factor": REQUIRED}, "linear", summary="PI: inv_j / s"),
    "ntk": Method(ntk, {"factor": REQUIRED}, "default", summary="base' = base·s^(d/(d-2))"),
    "dynamic": Method(
        dynamic,
        {"factor": REQUIRED},
        "dynamic",
        seq_len_dependent=True,
        inference_only=True,
        summary="base' = base·(s·n/L - (s-1))^(d/(d-2)), n = max(seq_len, L)",
    ),
    "yarn": Method(
        yarn,
        {
            "factor": REQUIRED,
            "beta_fast": 32,
            "beta_slow": 1,
            "truncate": True,
            "mscale": None,
            "mscale_all_dim": None,
            "attention_factor": None,
        },
        "yarn",
        needs_original=True,
        summary="ramp between extrapolation and PI; alpha = 0.1 ln s + 1",
    ),
    "llama3": Method(
        llama3,
        {"factor": REQUIRED, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "llama3",
        needs_original=True,
        summary="wavelength bands: keep / smooth / PI",
    ),
    "longrope": Method(
        longrope,
        {"short_factor": REQUIRED, "long_factor": REQUIRED, "factor": None, "attention_factor": None},
        "longrope",
        needs_original=True,
        seq_len_dependent=True,
        summary="per-dimension lambda (short/long); alpha = sqrt(1 + ln s / ln L0)",
    ),
}


def method_params(method: str) -> tuple[str, ...]:
    """Every key a `rope` mapping with this method may hold (besides `method`)."""
    m = _method(method)
    return tuple(dict.fromkeys([*m.params, *COMMON_PARAMS]))


_FLOAT_PARAMS = frozenset(
    {
        "rope_theta",
        "factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "low_freq_factor",
        "high_freq_factor",
    }
)
_INT_PARAMS = frozenset({"original_max_position_embeddings", "max_position_embeddings"})


def coerce_param(key: str, value: Any) -> Any:
    """A parameter value in its type; numeric strings are accepted because YAML reads `5e5` as a string.

    Raises ValueError saying what was expected.
    """
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
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a number (got {value!r})")
        if key in _INT_PARAMS:
            if value != int(value) or value <= 0:
                raise ValueError(f"expected a positive integer (got {value!r})")
            return int(value)
        return value  # kept as given (4 stays 4, 4.0 stays 4.0): the export then reads like the recipe
    if key == "truncate":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false (got {value!r})")
        return value
    if key in ("short_factor", "long_factor"):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"expected a list of numbers (got {value!r})")
        out = []
        for x in value:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
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


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown RoPE method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def resolve(method: str, params: Mapping[str, Any], spec: RotarySpec) -> tuple[RotarySpec, dict[str, Any]]:
    """The spec the exported model will compute with (base, L0, L) and the method's keyword arguments.

    Raises ValueError naming the key for unknown or missing parameters.
    """
    m = _method(method)
    params = normalize_params(method, params)
    for key, value in m.params.items():
        if value is REQUIRED and params.get(key) is None:
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
    elif method in ("yarn", "llama3") or (method == "longrope" and factor is not None):
        length = int(round(factor * original))  # transformers expects max_position_embeddings = s · L0
    elif method == "dynamic":
        # Dynamic NTK scales against max_position_embeddings itself and is the identity up to it: export the
        # pre-training length there (L0 when known), or the model keeps its pre-training frequencies up to the target.
        length = int(original or spec.max_position_embeddings)
    else:
        length = spec.max_position_embeddings  # linear / default / abf / ntk do not read it
    resolved = RotarySpec(
        head_dim=spec.head_dim,
        base=base,
        original_max_position_embeddings=int(original) if original else None,
        max_position_embeddings=length,
        partial_rotary_factor=spec.partial_rotary_factor,
    )
    kwargs = {k: params[k] for k in m.params if params.get(k) is not None}
    if method == "abf":
        kwargs["rope_theta"] = base
    return resolved, kwargs


def compute(
    method: str, spec: RotarySpec, params: Mapping[str, Any] | None = None, seq_len: int | torch.Tensor | None = None
) -> Rope:
    """(inv_freq, attention_factor) of `method` with midtrain-form `params`, as the exported model computes them."""
    resolved, kwargs = resolve(method, params or {}, spec)
    return METHODS[method].fn(resolved, seq_len=seq_len, **kwargs)


def to_rope_parameters(method: str, params: Mapping[str, Any], spec: RotarySpec) -> tuple[dict[str, Any], int | None]:
    """(transformers-5 `rope_parameters`, `max_position_embeddings`) that make an HF model compute `method`.

    default / abf / ntk export as `rope_type: default` with the new `rope_theta`; the others keep `rope_theta`
    and write L0. `max_position_embeddings`: s·L0 for yarn and llama3 (and longrope with a factor), L0 for dynamic
    (it only rescales beyond it), unchanged otherwise; an explicit `max_position_embeddings` parameter wins.
    """
    resolved, kwargs = resolve(method, params, spec)
    base, original = resolved.base, resolved.original_max_position_embeddings
    if method == "ntk":
        out: dict[str, Any] = {"rope_type": "default", "rope_theta": ntk_base(base, kwargs["factor"], spec.dim)}
    elif method in ("default", "abf"):
        out = {"rope_type": "default", "rope_theta": base}
    else:
        out = {"rope_type": METHODS[method].rope_type, "rope_theta": base}
        if method == "yarn":
            out["factor"] = kwargs["factor"]
            out["original_max_position_embeddings"] = original
            beta_fast, beta_slow = _betas(kwargs.get("beta_fast"), kwargs.get("beta_slow"))
            out.update(beta_fast=beta_fast, beta_slow=beta_slow, truncate=bool(kwargs.get("truncate", True)))
            for key in ("mscale", "mscale_all_dim"):
                if key in kwargs:
                    out[key] = kwargs[key]
            if "attention_factor" in kwargs:
                out["attention_factor"] = float(kwargs["attention_factor"])  # transformers warns on an int
        elif method == "llama3":
            out["factor"] = kwargs["factor"]
            out["original_max_position_embeddings"] = original
            out["low_freq_factor"] = kwargs.get("low_freq_factor", 1.0)
            out["high_freq_factor"] = kwargs.get("high_freq_factor", 4.0)
        elif method == "longrope":
            out["short_factor"] = [float(x) for x in kwargs["short_factor"]]
            out["long_factor"] = [float(x) for x in kwargs["long_factor"]]
            out["original_max_position_embeddings"] = original
            for key in ("factor", "attention_factor"):
                if key in kwargs:
                    out[key] = kwargs[key]
        else:  # linear, dynamic
            out["factor"] = kwargs["factor"]
    if spec.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = spec.partial_rotary_factor  # replacing the dict must not drop it
    return out, resolved.max_position_embeddings


# ------------------------------------------------------------------------------------------------------ display
def scale_factors(inv_freq_new: torch.Tensor, inv_freq_default: torch.Tensor) -> torch.Tensor:
    """Per-dimension interpolation factor default/new: 1 = unchanged, s = fully interpolated (PI)."""
    return inv_freq_default.double() / inv_freq_new.double()


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Wavelength in tokens of each dimension pair: 2π / inv_freq."""
    return 2 * math.pi / inv_freq.double()


def _show_params(method: str, factor: float | None, params: Mapping[str, Any], spec: RotarySpec) -> dict[str, Any]:
    accepted = set(method_params(method))
    out = {k: v for k, v in params.items() if k in accepted and v is not None}
    if "factor" in METHODS[method].params and factor is not None:
        out["factor"] = factor
    if method == "abf" and "rope_theta" not in out:
        raise ValueError("abf: rope_show needs rope_theta= (the new base)")
    if method == "longrope" and factor is not None:
        out.setdefault("long_factor", longrope_initial_factors(spec, factor))
        out.setdefault("short_factor", [1.0] * (spec.dim // 2))
    return out


def rope_show(
    method: str | Sequence[str],
    factor: float | None,
    base: float,
    head_dim: int,
    original: int,
    target: int | None = None,
    plot: str | Path | None = None,
    *,
    partial_rotary_factor: float = 1.0,
    **params: Any,
) -> str:
    """A printable per-dimension table (wavelength, scale factor) and attention factor of one or more methods.

    `method` may be a list or a comma-separated string. Frequencies are shown at `target` (default s·L0), which
    matters for dynamic and longrope. `params` go to the methods that accept them (e.g. beta_fast to yarn only).
    longrope without factor lists shows the LongRoPE search's starting point (λ from the YaRN ramp). With `plot`,
    draws wavelength vs scale factor (log x), one curve per method, written atomically.
    """
    methods = [m.strip() for m in (method.split(",") if isinstance(method, str) else method) if m.strip()]
    if not methods:
        raise ValueError("rope_show: no method given")
    for name in methods:
        _method(name)
    unknown = set(params) - {k for name in methods for k in method_params(name)}
    if unknown:
        raise ValueError(f"rope_show: unknown parameter(s) {', '.join(sorted(unknown))} for {', '.join(methods)}")
    if target is None:
        target = int(round((factor or 1) * original))
    spec = RotarySpec(
        head_dim=head_dim,
        base=float(base),
        original_max_position_embeddings=original,
        max_position_embeddings=target,
        partial_rotary_factor=partial_rotary_factor,
    )
    inv_default, _ = default(spec)
    wl_default = wavelengths(inv_default)
    lines = [
        f"RoPE remapping: head_dim {head_dim} (d = {spec.dim} rotated), base {base:g}, L0 {original}, "
        f"target {target}" + (f", factor {factor:g}" if factor is not None else "")
    ]
    curves = []
    for name in methods:
        p = _show_params(name, factor, params, spec)
        resolved, _ = resolve(name, p, spec)
        inv, attn = compute(name, spec, p, seq_len=target)  # dynamic / longrope: as at the target length
        sf = scale_factors(inv, inv_default)
        curves.append((name if attn == 1 else f"{name} (α = {attn:.3g})", wl_default, sf))
        lines.append("")
        reads_length = name in ("yarn", "llama3", "longrope", "dynamic")
        lines.append(
            f"[{name}] {METHODS[name].summary}; attention_factor {attn:.6g} (logits x{attn * attn:.6g})"
            + (f"; exports max_position_embeddings={resolved.max_position_embeddings}" if reads_length else "")
        )
        if name == "dynamic":
            lines.append(f"  (frequencies at seq_len {target}; identity up to {resolved.max_position_embeddings})")
        if name == "longrope" and "long_factor" not in params:
            lines.append("  (long factors = LongRoPE search's start: lambda from the YaRN ramp; short = 1)")
        lines.append(f"  {'j':>3} {'wavelength':>12} {'new wavelength':>15} {'scale':>8}  regime")
        full = float(p.get("factor") or sf.max())
        for j in range(len(inv)):
            s = float(sf[j])
            regime = "kept" if abs(s - 1) < 1e-6 else ("interpolated" if abs(s - full) < 1e-6 * full else "blend")
            lines.append(
                f"  {j:>3} {float(wl_default[j]):>12.1f} {float(wavelengths(inv)[j]):>15.1f} {s:>8.4f}  {regime}"
            )
    if plot is not None:
        _plot(curves, Path(plot), original, spec)
        lines.append("")
        lines.append(f"plot written to {plot}")
    return "\n".join(lines)


def _plot(curves: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path, original: int, spec: RotarySpec) -> None:
    from matplotlib.figure import Figure  # lazy; Figure renders with Agg, no pyplot state

    from midtrain.io import write_bytes_atomic

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    for name, wl, sf in curves:
        ax.plot(wl.numpy(), sf.numpy(), marker=".", label=name)
    ax.axvline(original, color="grey", linestyle="--", linewidth=0.8)
    ax.annotate(" L0", (original, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("pre-training wavelength 2π/θ_j (tokens, log)")
    ax.set_ylabel("scale factor θ_j / θ'_j")
    ax.set_title(f"RoPE remapping (d = {spec.dim}, base {spec.base:g}, L0 {original})", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
