"""What a researcher pastes from the report (issue 24): each stage's RoPE setting, context and wall time; absolute
changes for accuracies; and only this run's own paths, even when a shared token cache was filled by another run."""

from __future__ import annotations

import json
import shutil

from midtrain.layout import RunLayout
from midtrain.report.build import _change

from ..train.tiny import midtrain, write_recipe


def test_changes_are_relative_for_losses_and_absolute_for_scores():
    assert _change(2.0, 1.5, "loss.math") == "-25.0%"
    assert _change(0.26, 0.99, "passkey@512") == "+0.73"  # was "+280.8%"
    assert _change(0.0, 0.0, "niah@512") == "+0.00"  # was blank
    assert _change(10.0, 12.0, "ppl@1024") == "+20.0%"


def test_the_stage_table_shows_rope_and_wall_time_and_data_paths_are_this_runs(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    recipe = write_recipe(first, warm_tokens=1024, anneal_tokens=1024)
    second = tmp_path / "second"
    shutil.copytree(first, second)  # the same data under another path: the shared cache holds first's path
    rope = "stages.anneal.rope={method: abf, rope_theta: 20000}"
    for root in (first, second):
        midtrain("run", str(root / recipe.name), "--set", f"run_dir={root / 'run'}", "--set", rope,
                 cache=tmp_path / "cache")
    layout = RunLayout(second / "run")
    report = layout.report_md.read_text()
    anneal = next(line for line in report.splitlines() if line.startswith("| anneal |"))
    warm = next(line for line in report.splitlines() if line.startswith("| warm |"))
    assert "| abf θ 20000 |" in anneal and "| as the base |" in warm
    assert "| RoPE |" in report and "| wall |" in report
    wall = warm.split("|")[9].strip()
    assert wall.count(":") == 1 and wall.split(":")[1].isdigit()
    tokenized = json.loads(layout.tokenize_report.read_text())
    assert all(entry["path"].startswith(str(second)) for entry in tokenized.values()), tokenized
    assert str(first) not in report
