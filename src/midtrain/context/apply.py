"""Write a stage's `rope` setting into an HF model: config.rope_parameters plus rebuilt rotary embeddings.

transformers computes inv_freq once when the rotary module is built, so changing the config alone changes nothing
until the module is rebuilt; both must change together or the export would not behave like the trained model.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every rotary embedding in an HF model."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding"):
                found.append((parent, attr, child))
    return found


def apply_rope(model: nn.Module, rope: dict[str, Any] | None) -> None:
    """Merges `rope` into `config.rope_parameters` (keeping rope_theta unless given) and rebuilds rotary modules."""
    if not rope:
        return
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    new = dict(rope)
    if "max_position_embeddings" in new:
        config.max_position_embeddings = int(new.pop("max_position_embeddings"))
    if new.get("rope_type", params.get("rope_type")) != params.get("rope_type"):
        # A different method: drop the old method's parameters, keep the base frequency.
        params = {"rope_theta": params.get("rope_theta")}
    params.update(new)
    params.setdefault("rope_type", "default")
    config.rope_parameters = params
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    for parent, attr, module in rotary_modules(model):
        device = module.inv_freq.device if hasattr(module, "inv_freq") else None
        rebuilt = type(module)(config=config)
        setattr(parent, attr, rebuilt.to(device) if device is not None else rebuilt)
