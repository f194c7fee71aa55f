"""Write a stage's `rope` setting into an HF model: config.rope_parameters plus rebuilt rotary embeddings.

transformers computes inv_freq once when the rotary module is built, so changing the config alone changes nothing
until the module is rebuilt; both must change together or the export would not behave like the trained model.

The setting is a parsed `RopeSetting` (`midtrain.context.setting`): midtrain's method form is translated by
`to_rope_parameters`, a raw transformers dict merged into the current `rope_parameters` as given. The checks
(`midtrain.context.checks`) are torch-free; `validate_rope` and `stage_rope_issues` are re-exported from there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from midtrain.context.checks import rope_issues, stage_rope_issues, validate_rope  # noqa: F401 (re-exported)
from midtrain.context.methods import RECORD, base_spec  # noqa: F401 (re-exported)
from midtrain.context.setting import HF_ROPE_KEYS, RopeSetting, RopeSettingError, parse_rope  # noqa: F401

# Model properties that live in rope_parameters but are not a method's parameter: a replaced dict keeps them.
_KEPT_KEYS = ("partial_rotary_factor", "mrope_section")


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
    old = dict(getattr(config, "rope_parameters", None) or {})
    try:
        setting = parse_rope(rope, current=old)
        assert setting is not None
        spec = base_spec(config)
        errors = [i for i in rope_issues(setting, spec=spec, training=False) if i.severity == "error"]
    except RopeSettingError as e:
        errors = e.issues
    except (ValueError, AttributeError) as e:  # the config's own rotary setup cannot be read
        raise ValueError(f"invalid rope setting: rope: cannot read the model's rotary setup: {e}") from None
    if errors:
        raise RopeSettingError(errors)
    record = None
    if setting.form == "method":
        rope_parameters, max_pos = setting.rope_parameters(spec)
        for key in _KEPT_KEYS:
            if key in old:
                rope_parameters.setdefault(key, old[key])
        record = {"method": setting.method, **setting.params, "base_rope_theta": spec.base}
    else:
        rope_parameters = dict(old)
        new = dict(setting.written)
        max_pos = new.pop("max_position_embeddings", None)
        if new.get("rope_type", rope_parameters.get("rope_type")) != rope_parameters.get("rope_type"):
            # A different method: drop the old method's parameters, keep the base frequency and model properties.
            rope_parameters = {k: rope_parameters[k] for k in ("rope_theta", *_KEPT_KEYS) if k in rope_parameters}
        rope_parameters.update(new)
        rope_parameters.setdefault("rope_type", "default")
    # Let the model family's own config validation judge the result before the live config changes.
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope_parameters)
    if max_pos is not None:
        trial.max_position_embeddings = int(max_pos)
    if hasattr(trial, "validate_rope"):
        try:
            trial.validate_rope()
        except (KeyError, ValueError) as e:
            raise ValueError(f"invalid rope setting for a {config.model_type!r} model: {e}") from None
    config.rope_parameters = rope_parameters
    if max_pos is not None:
        config.max_position_embeddings = int(max_pos)
    if record is not None or getattr(config, RECORD, None) is not None:
        setattr(config, RECORD, record)  # a raw dict replaces whatever a method form wrote
    for parent, attr, module in rotary_modules(model):
        device = module.inv_freq.device if hasattr(module, "inv_freq") else None
        rebuilt = type(module)(config=config)
        setattr(parent, attr, rebuilt.to(device) if device is not None else rebuilt)
