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
from pathlib import Path
from typing import Any

import torch

from midtrain.context.checks import rope_issues
from midtrain.context.methods import (  # noqa: F401  (re-exported: the torch-free table and math live there)
    COMMON_PARAMS,
    METHODS,
    REQUIRED,
    MethodInfo,
    RotarySpec,
    betas,
    coerce_param,
    longrope_attention_factor,
    method_info,
    method_params,
    normalize_params,
    ntk_base,
    resolve,
    to_rope_parameters,
    yarn_attention_factor,
    yarn_correction_range,
    yarn_mscale,
)
from midtrain.context.setting import RopeSetting, RopeSettingError, parse_rope
from midtrain.io import write_bytes_atomic

Rope = tuple[torch.Tensor, float]


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


def yarn_extrapolation(spec: RotarySpec, **params: Any) -> torch.Tensor:
    """e_j in [0, 1]: 1 keeps dimension j as in pre-training, 0 interpolates it fully (divides by s)."""
    original = _need(spec.original_max_position_embeddings, "original_max_position_embeddings", "yarn")
    beta_fast, beta_slow = betas(params.get("beta_fast"), params.get("beta_slow"))
    low, high = yarn_correction_range(spec.dim, spec.base, original, beta_fast, beta_slow, params.get("truncate", True))
    if low == high:
        high += 0.001  # transformers: prevent a zero-width ramp
    ramp = torch.clamp((torch.arange(spec.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return 1 - ramp


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


# ---------------------------------------------------------------------------------------------- the functions
#: The computation of each method in `midtrain.context.methods.METHODS` (the table: parameters, traits, export).
FUNCTIONS: dict[str, Callable[..., Rope]] = {
    "default": default,
    "abf": abf,
    "linear": linear,
    "ntk": ntk,
    "dynamic": dynamic,
    "yarn": yarn,
    "llama3": llama3,
    "longrope": longrope,
}
assert FUNCTIONS.keys() == METHODS.keys(), "every method in the table needs its function"


def compute(
    method: str, spec: RotarySpec, params: Mapping[str, Any] | None = None, seq_len: int | torch.Tensor | None = None
) -> Rope:
    """(inv_freq, attention_factor) of `method` with midtrain-form `params`, as the exported model computes them."""
    resolved, kwargs = resolve(method, params or {}, spec)
    return FUNCTIONS[method](resolved, seq_len=seq_len, **kwargs)


# ------------------------------------------------------------------------------------------------------ display
def scale_factors(inv_freq_new: torch.Tensor, inv_freq_default: torch.Tensor) -> torch.Tensor:
    """Per-dimension interpolation factor default/new: 1 = unchanged, s = fully interpolated (PI)."""
    return inv_freq_default.double() / inv_freq_new.double()


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Wavelength in tokens of each dimension pair: 2π / inv_freq."""
    return 2 * math.pi / inv_freq.double()


def _show_setting(method: str, factor: float | None, params: Mapping[str, Any], spec: RotarySpec) -> RopeSetting:
    """The method's setting from rope_show's arguments (parameters it does not take left out), parsed and checked
    like a recipe's `rope:` (errors raise RopeSettingError with paths `METHOD.key`)."""
    info = method_info(method)
    raw: dict[str, Any] = {"method": method}
    raw.update((k, v) for k, v in params.items() if k in info.accepted and v is not None)
    if info.has_factor and factor is not None:
        raw["factor"] = factor
    if "long_factor" in info.params and factor is not None:  # without lists: the LongRoPE search's start
        raw.setdefault("long_factor", longrope_initial_factors(spec, factor))
        raw.setdefault("short_factor", [1.0] * (spec.dim // 2))
    setting = parse_rope(raw, (method,))
    assert setting is not None
    errors = [i for i in rope_issues(setting, spec=spec, training=False, path=(method,)) if i.severity == "error"]
    if errors:
        raise RopeSettingError(errors)
    return setting


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
        method_info(name)
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
        setting = _show_setting(name, factor, params, spec)
        info, p = setting.info, setting.params
        resolved, _ = resolve(name, p, spec)
        inv, attn = compute(name, spec, p, seq_len=target)  # dynamic / longrope: as at the target length
        sf = scale_factors(inv, inv_default)
        curves.append((name if attn == 1 else f"{name} (α = {attn:.3g})", wl_default, sf))
        lines.append("")
        lines.append(
            f"[{name}] {info.summary}; attention_factor {attn:.6g} (logits x{attn * attn:.6g})"
            + (f"; exports max_position_embeddings={resolved.max_position_embeddings}" if info.reads_length else "")
        )
        if info.switches_at == "max_position":
            lines.append(f"  (frequencies at seq_len {target}; identity up to {resolved.max_position_embeddings})")
        if "long_factor" in info.params and "long_factor" not in params:
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
