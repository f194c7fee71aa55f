"""`midtrain run --profile-steps A:B`: a trace of exactly those steps, per rank and stage."""

from __future__ import annotations

import json

import pytest

from midtrain.train.profiling import parse_step_range

from .tiny import midtrain, train_rows, write_recipe


def test_step_ranges_parse_and_bad_ones_are_refused():
    assert parse_step_range("3:5") == (3, 5)
    assert parse_step_range("4") == (4, 4)
    for bad in ("0:2", "5:3", "a:b", "2:", ""):
        with pytest.raises(ValueError, match="profile steps"):
            parse_step_range(bad)


def test_profiled_steps_leave_a_trace_and_a_table(tmp_path, monkeypatch):
    from midtrain.config import load_recipe
    from midtrain.run import RunOptions, run

    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=1024, every=4096),
                         [f"run_dir={tmp_path / 'run'}"])
    run(recipe, RunOptions(progress=False, profile_steps=(2, 3)))
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # the run itself is unchanged
    profile = tmp_path / "run" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0-steps2-3.json", "rank0-steps2-3.txt"]
    events = json.loads((profile / "rank0-steps2-3.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the model's matmuls were recorded
    table = (profile / "rank0-steps2-3.txt").read_text()
    assert table.startswith("global steps 2-3, rank 0") and "aten::mm" in table


def test_a_range_across_stages_gives_a_trace_per_stage(tmp_path):
    recipe = write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=1024, every=4096)
    run_dir = tmp_path / "run"
    midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", "--profile-steps", "3:1000", cache=tmp_path / "c")
    rows = train_rows(run_dir)
    end = max(r["step"] for r in rows if r["stage"] == rows[0]["stage"])
    assert sorted(p.name for p in (run_dir / "profile").glob("*.json")) == [
        f"rank0-steps3-{end}.json", f"rank0-steps{end + 1}-{rows[-1]['step']}.json"]
    bad = midtrain("run", str(recipe), "--profile-steps", "5:3", cache=tmp_path / "c", check=False)
    assert bad.returncode == 2 and "1 <= A <= B" in bad.stderr and "Traceback" not in bad.stderr
