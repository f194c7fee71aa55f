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


def test_plots_a_researcher_reads(monkeypatch, tmp_path):
    from midtrain.report import plots
    from midtrain.report.build import _labelled_evals

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    stages = [{"name": "anneal", "first_tokens": 0, "tokens": 1000, "mixture": {"web": 0.5, "math": 0.5}},
              {"name": "extend", "first_tokens": 1000, "tokens": 1000, "mixture": {"web": 1.0}}]
    evals = {"anneal": ({"metrics": {"passkey@128": 0.9}}, {"metrics": {"passkey@128": 1.0}}),
             "extend": ({"metrics": {"passkey@512": 0.0}}, {"metrics": {"passkey@512": 0.99}})}
    labelled = _labelled_evals(stages, evals)
    assert list(labelled) == ["start (anneal before)", "anneal", "extend before", "extend"]  # extend's start shown
    plots.per_length(labelled, "passkey", "accuracy", "Passkey", tmp_path / "p.png")
    assert figures[-1].axes[0].get_ylim() == (0.0, 1.05)  # fixed, not autoscaled to the data
    plots.lr_and_mixture([], stages, tmp_path / "m.png")
    bottom = figures[-1].axes[1]
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["0", "50%", "100%"]
    assert bottom.get_legend().get_bbox_to_anchor().x0 > bottom.get_window_extent().x1 - 1  # beside the bars
    rows = [{"event": "train", "tokens": 100 * i, "loss": 3.0 - 0.01 * i + (0.3 if i % 2 else 0.0), "step": i,
             "stage": "anneal" if i <= 10 else "extend"} for i in range(1, 21)]
    plots.loss_curves(rows, stages, tmp_path / "l.png")
    lines = figures[-1].axes[0].get_lines()
    raw = [ln for ln in lines if ln.get_alpha() == 0.25]
    smooth = [ln for ln in lines if ln.get_alpha() is None and ln.get_linewidth() == 1.3]
    assert len(raw) == len(smooth) == 2  # one per stage: no line drawn across the boundary
    assert max(abs(y2 - y1) for y1, y2 in zip(smooth[0].get_ydata(), smooth[0].get_ydata()[1:])) < 0.3
