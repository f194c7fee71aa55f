"""Model FLOPs per trained token and a measured matmul peak: the two halves of MFU.

MFU = training_flops_per_token × tokens/s ÷ peak. The numerator counts what the model must compute, not what a
kernel happened to do (PaLM, appendix B): 6 FLOPs per matmul parameter per token (2 forward, 4 backward) for every
`nn.Linear` weight, the output head included even when it is tied to the embedding (it is still a [d, V] matmul;
the embedding lookup is not), plus causal attention, 6 · n_layers · seq_len · (heads × head_dim) per token
(QKᵀ and AV, 2·2·T·d per token forward at full T, halved by causality, ×3 for forward + backward).

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
    """Causal attention, forward + backward, per token at row length T: 6 · n_layers · T · (heads · head_dim)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * config.num_hidden_layers * seq_len * heads * head_dim


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
