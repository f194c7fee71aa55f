"""Long-context extension: RoPE frequency remapping written into HF configs and models.

Names load lazily so that importing the package costs nothing: `setting`, `checks` and `methods` are torch-free
(config/ parses recipes with them), `rope`, `apply` and `search` need torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "apply_rope": "midtrain.context.apply",
    "rope_issues": "midtrain.context.checks",
    "setting_issues": "midtrain.context.checks",
    "stage_rope_issues": "midtrain.context.checks",
    "validate_rope": "midtrain.context.checks",
    "METHODS": "midtrain.context.methods",
    "MethodInfo": "midtrain.context.methods",
    "RotarySpec": "midtrain.context.methods",
    "base_spec": "midtrain.context.methods",
    "to_rope_parameters": "midtrain.context.methods",
    "RopeIssue": "midtrain.context.setting",
    "RopeSetting": "midtrain.context.setting",
    "RopeSettingError": "midtrain.context.setting",
    "parse_rope": "midtrain.context.setting",
    "SearchConfig": "midtrain.context.search",
    "compute": "midtrain.context.rope",
    "longrope_search": "midtrain.context.search",
    "rope_show": "midtrain.context.rope",
    "scale_factors": "midtrain.context.rope",
    "wavelengths": "midtrain.context.rope",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'midtrain.context' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
