"""Model FLOPs per trained token and a measured matmul peak: the two halves of MFU.

MFU = training_flops_per_token × tokens/s ÷ peak. The numerator counts what the model must compute, not what a
kernel happened to do (PaLM, appendix B): 6 FLOPs per matmul parameter per token (2 forward, 4 backward) for every
`nn.Linear` weight, the output head included even when it is tied to the embedding (it is still a [d, V] matmul;
the embedding lookup is not), plus causal attention, 6 · seq_len · (heads × head_dim) per token and
full-attention layer (QKᵀ and AV, 2·2·T·d per token forward at full T, halved by causality, ×3 for forward +
backward); sliding-window and chunked layers count the keys they attend (`attention_flops_per_token`), each layer
with its own head shape.

Packed rows count attention at the row length even where document masking does less work, as is the convention;
dense models only (an MoE's experts are not `nn.Linear` modules and only some of them run per token).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def matmul_parameters(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: every `nn.Linear` weight, counted once per module (a tied
    output head counts: it is a second matmul with the embedding's storage)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """Causal attention, forward + backward, per token at row length T, summed over the layers.

    A full-attention layer: 6 · T · heads · head_dim (its queries see T/2 keys on average). A layer attends fewer
    keys where its type says so (transformers' `config.layer_types`, or the family's implied types): a sliding
    window w sees min(i, w) keys at position i, on average w' - w'²/2T with w' = min(w, T), so 6 · (2w' - w'²/T) ·
    heads · head_dim (= the full layer's at w ≥ T); a chunk of c (Llama 4) sees c'/2 keys with c' = min(c, T),
    so 6 · c' · heads · head_dim. Heads and head_dim are each layer's own (Gemma 4's global layers are wider);
    recurrent, convolution and linear-attention layers have no quadratic term (their projections are in
    `matmul_parameters`).
    """
    total = 0
    for layer, kind in zip(_layer_configs(config), _layer_kinds(config)):
        if kind is None:
            continue
        heads = _plain(layer, "num_attention_heads")
        if not heads:
            continue
        head_dim = _plain(layer, "head_dim") or (_plain(layer, "hidden_size") or 0) // heads
        qk_dim = _plain(layer, "qk_head_dim") or head_dim  # MLA: queries/keys and values differ in width
        v_dim = _plain(layer, "v_head_dim") or head_dim
        width = heads * (qk_dim + v_dim)  # 2 · heads · head_dim where the two agree
        span = _span(layer, kind)
        if kind == "sliding" and span is not None and span < seq_len:
            total += 3 * width * (2 * span * seq_len - span * span) // seq_len
        elif kind == "chunked" and span is not None and span < seq_len:
            total += 3 * width * span
        else:
            total += 3 * width * seq_len
    return total


# Layer types (transformers' names, see midtrain.model.families) without a quadratic attention term.
_NO_ATTENTION = frozenset({"linear_attention", "conv", "mamba", "mamba2", "recurrent", "rwkv", "ssm"})


def _layer_kinds(config: Any) -> list[str | None]:
    """Each layer's attention span kind: "full", "sliding", "chunked", or None (no attention matrix)."""
    from midtrain.model.families import layer_types

    kinds: list[str | None] = []
    for t in layer_types(config):
        if t in _NO_ATTENTION:
            kinds.append(None)
        elif "sliding" in t:  # sliding_attention, hybrid_sliding
            kinds.append("sliding")
        elif "chunk" in t:
            kinds.append("chunked")
        else:  # full_attention, attention, hybrid (attention beside a state-space mixer), unknown types
            kinds.append("full")
    return kinds


def _layer_configs(config: Any) -> list[Any]:
    """One config per decoder layer: transformers' per-layer view of a heterogeneous config (`per_layer_config`,
    Gemma 4), where reading a per-layer attribute from the global config raises; the config itself otherwise."""
    n = int(_plain(config, "num_hidden_layers") or 0)
    if getattr(config, "is_heterogeneous", False):
        view = config.per_layer_config
        return [view[i] for i in range(n)]
    return [config] * n


def _plain(config: Any, key: str) -> Any:
    """`config.key`, None when the config has no such attribute (or only per layer)."""
    try:
        return getattr(config, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return None


def _span(layer: Any, kind: str) -> int | None:
    if kind == "sliding":
        from midtrain.model.families import sliding_window

        try:
            return sliding_window(layer)
        except RuntimeError:
            return None
    if kind == "chunked":
        chunk = _plain(layer, "attention_chunk_size")
        return int(chunk) if chunk else None
    return None


def is_dense(config: Any) -> bool:
    """False for mixture-of-experts configs, whose per-token FLOPs this module does not count."""
    return not any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def training_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Model FLOPs of one trained token (forward + backward) at row length `seq_len`; see the module docstring."""
    from midtrain.model.hf import unwrap_model

    inner = unwrap_model(model)
    return 6 * matmul_parameters(inner) + attention_flops_per_token(inner.config, seq_len)


_PEAKS: dict[tuple[str, torch.dtype, int], float] = {}


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0, device: str | torch.device = "cpu"
) -> float:
    """Best achieved FLOP/s of a square `size`³ matmul in `dtype` over about `seconds` (best of the repeats: the
    peak the hardware gives this process right now, with the current thread count). Draws no global random numbers
    (a run's RNG streams stay as they were)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    flops = 2 * size**3

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: first-call dispatch and allocation
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
        if time.perf_counter() >= deadline:
            break
    return flops / best


def matmul_peak_cached(dtype: torch.dtype, size: int, seconds: float, device: torch.device) -> float:
    """`measure_matmul_peak`, measured once per process and (device, dtype, size): runs log MFU without paying
    the measurement at every stage."""
    key = (str(device), dtype, size)
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_peak(dtype, size=size, seconds=seconds, device=device)
    return _PEAKS[key]
