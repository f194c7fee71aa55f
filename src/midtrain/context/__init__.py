"""Long-context extension: RoPE frequency remapping written into HF configs and models."""

from midtrain.context.apply import apply_rope, validate_rope
from midtrain.context.rope import (
    METHODS,
    RotarySpec,
    compute,
    rope_show,
    scale_factors,
    to_rope_parameters,
    wavelengths,
)

__all__ = [
    "METHODS",
    "RotarySpec",
    "apply_rope",
    "compute",
    "rope_show",
    "scale_factors",
    "to_rope_parameters",
    "validate_rope",
    "wavelengths",
]
