"""Long-context extension: RoPE frequency remapping written into HF configs and models.

Names load lazily so that `midtrain --help` (which imports `midtrain.context.cli`) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "apply_rope": "midtrain.context.apply",
    "stage_rope_issues": "midtrain.context.apply",
    "validate_rope": "midtrain.context.apply",
    "METHODS": "midtrain.context.rope",
    "RotarySpec": "midtrain.context.rope",
    "SearchConfig": "midtrain.context.search",
    "compute": "midtrain.context.rope",
    "longrope_search": "midtrain.context.search",
    "rope_show": "midtrain.context.rope",
    "scale_factors": "midtrain.context.rope",
    "to_rope_parameters": "midtrain.context.rope",
    "wavelengths": "midtrain.context.rope",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'midtrain.context' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
