"""docs/CONTRACTS.md is the spec other modules build on: keep its recipe tables in step with the schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from midtrain.config import recipe as schema

DOC = (Path(__file__).parents[1] / "docs" / "CONTRACTS.md").read_text()


def _table_keys(heading: str) -> set[str]:
    """First-column keys of the markdown table under `heading` (until the next heading)."""
    section = DOC.split(heading, 1)[1]
    section = re.split(r"\n#+ ", section, maxsplit=1)[0]
    keys = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def documented_metric_key(key: str) -> bool:
    """True if a metrics.jsonl key is in CONTRACTS §3 (`loss.general` matches `loss.<domain>`)."""
    documented = _table_keys("## 3. `metrics.jsonl`")
    generic = re.sub(r"\.[^.]+$", ".<domain>", key)
    return key in documented or generic in documented


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    return {prefix + name for name in model.model_fields}


@pytest.mark.parametrize(
    "heading,expected",
    [
        ("### Top level", (_fields(schema.Recipe) - {"step_guard"}) | _fields(schema.StepGuardConfig, "step_guard.")),
        ("### Source", _fields(schema.Source)),
        ("### Checkpoint", _fields(schema.CheckpointConfig)),
        ("### 1.1 Schedule", _fields(schema.ScheduleConfig)),
        ("### 1.3 Monitor", _fields(schema.MonitorConfig)),
        ("### 1.4 Averaging", _fields(schema.AverageConfig)),
        (
            "### Stage",
            (_fields(schema.Stage) - {"batch", "optimizer", "data", "eval", "schedule"})
            | _fields(schema.BatchConfig, "batch.")
            | _fields(schema.OptimizerConfig, "optimizer.")
            | _fields(schema.DataConfig, "data.")
            | _fields(schema.EvalConfig, "eval.")
            | {"schedule"},
        ),
    ],
)
def test_recipe_tables_list_exactly_the_schema_fields(heading, expected):
    assert _table_keys(heading) == expected


def test_metric_key_matcher():
    assert documented_metric_key("loss.general") and documented_metric_key("val_loss.math")
    assert documented_metric_key("tokens_per_s") and not documented_metric_key("made_up")
