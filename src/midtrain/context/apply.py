"""Write a stage's `rope` setting into an HF model: config.rope_parameters plus rebuilt rotary embeddings.

transformers computes inv_freq once when the rotary module is built, so changing the config alone changes nothing
until the module is rebuilt; both must change together or the export would not behave like the trained model.

The setting is a parsed `RopeSetting` (`midtrain.context.setting`): midtrain's method form is translated by
`to_rope_parameters`, a raw transformers dict merged into the current `rope_parameters` as given. The checks
(`midtrain.context.checks`) are torch-free; `validate_rope` and `stage_rope_issues` are re-exported from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from midtrain.context.checks import config_rope_issues, rope_issues, stage_rope_issues, validate_rope  # noqa: F401
from midtrain.context.methods import RECORD, base_spec  # noqa: F401 (re-exported)
from midtrain.context.remap import remap_rope
from midtrain.context.setting import HF_ROPE_KEYS, RopeSetting, RopeSettingError, parse_rope  # noqa: F401


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every rotary embedding in an HF model."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding"):
                found.append((parent, attr, child))
    return found


def apply_rope(model: nn.Module, rope: RopeSetting | Mapping[str, Any] | None) -> None:
    """Write `rope` into `config.rope_parameters` / `max_position_embeddings` and rebuild the rotary modules.

    `rope` is a parsed `RopeSetting` (a recipe stage's `.rope`) or a raw mapping, parsed here. A method form goes
    through `to_rope_parameters`; a transformers dict is merged into the current `rope_parameters` (keeping
    `rope_theta` unless given). Raises RopeSettingError (a ValueError) on an unusable setting (training-only checks
    excluded: this also serves evaluation) and ValueError when the model family's config refuses the result; the
    model is then left untouched.
    """
    if not rope:
        return
    config = model.config
    errors = [i for i in config_rope_issues(rope, config, training=False) if i.severity == "error"]
    if errors:  # includes the family's own config validation of the result: the model is left untouched
        raise RopeSettingError(errors)
    remap = remap_rope(config, rope)
    rope_parameters, max_pos, record = remap.rope_parameters, remap.max_position_embeddings, remap.record
    config.rope_parameters = rope_parameters
    if max_pos is not None:
        config.max_position_embeddings = int(max_pos)
    if record is not None or getattr(config, RECORD, None) is not None:
        setattr(config, RECORD, record)  # a raw dict replaces whatever a method form wrote
    for parent, attr, module in rotary_modules(model):  # per-layer-type modules rebuild every type from the config
        buffer = next(module.buffers(), None)  # inv_freq, or <layer type>_inv_freq per layer type
        device = buffer.device if buffer is not None else None
        rebuilt = type(module)(config=config)
        setattr(parent, attr, rebuilt.to(device) if device is not None else rebuilt)

