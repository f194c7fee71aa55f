"""`start_lr: from_base`: a first stage starts at the LR the base checkpoint's last step used (midtrain.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midtrain.config import RecipeError, load_recipe
from midtrain.plan import build_plan

HEADER = """\
base: {base}
tokenizer: bytes
sources:
  - {{name: prose, path: prose.jsonl}}
stages:
"""
STAGE = """\
  - name: {name}
{extra}    tokens: 64k
    seq_len: 128
    batch: {{{{tokens: 4096}}}}
    schedule: {{{{kind: wsd, {peak}decay_fraction: 1.0}}}}
    data: {{{{mixture: {{{{prose: 1}}}}}}}}
"""
RECIPE = HEADER + STAGE.format(name="anneal", extra="    start_lr: from_base\n", peak="")


def _recipe(tmp_path: Path, meta: dict | None, text: str = RECIPE) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    if meta is not None:
        (base / "midtrain.json").write_text(json.dumps(meta))
    (tmp_path / "prose.jsonl").write_text('{"text": "hello"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(base=base))
    return path


def test_first_stage_starts_at_the_bases_last_lr(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, {"stage": "pretrain", "last_lr": 4e-4, "tokens": 1000}))
    assert recipe.stages[0].start_lr == pytest.approx(4e-4)
    stage = build_plan(recipe).stages[0]
    assert stage.lr_at_step(0) == pytest.approx(4e-4)  # no warm-up: the start LR is the peak, then linear to 0
    assert stage.last_lr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("meta,message", [
    (None, "midtrain.json not found"),
    ({"stage": "x"}, "cannot read last_lr"),
    ({"last_lr": "fast"}, "not a non-negative number"),
])
def test_unusable_base_metadata_names_the_file_and_line(tmp_path, meta, message):
    path = _recipe(tmp_path, meta)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert message in text and "midtrain.json" in text
    assert f"{path}:7: stages.anneal.start_lr" in text  # recipe file and line of the key


def test_from_base_only_in_the_first_stage(tmp_path):
    text = (HEADER + STAGE.format(name="anneal", extra="", peak="peak_lr: 1e-3, ")
            + STAGE.format(name="extend", extra="    init: weights\n    start_lr: from_base\n", peak=""))
    with pytest.raises(RecipeError, match="from_base is for the first stage"):
        load_recipe(_recipe(tmp_path, {"last_lr": 1e-3}, text))
