"""Long-context extension: RoPE frequency remapping written into HF configs and models."""

from midtrain.context.apply import apply_rope

__all__ = ["apply_rope"]
