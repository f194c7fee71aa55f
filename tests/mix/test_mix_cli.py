"""`midtrain mix` refuses bad input with one line and exit 2 (in process: no training, no subprocess start-up)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from midtrain.cli import app
from tests.mix.toy import write_recipe


@pytest.mark.parametrize("args, message", [
    (["search", "--stage", "warm", "--target", "loss.poetry"], "unknown domain 'poetry'"),
    (["search", "--stage", "cooldown", "--target", "loss"], "no stage 'cooldown' (stages: warm, anneal)"),
    (["search", "--stage", "warm", "--target", "loss", "--proxies", "2"], "at least 3 proxies"),
    (["search", "--stage", "warm", "--target", "loss", "--tokens", "2x"], "--tokens: expected a token count"),
    (["value", "--stage", "warm", "--candidate", "poetry"], "neither a source of the recipe"),
    (["value", "--stage", "warm", "--candidate", "math", "--seeds", "1,a"], "--seeds '1,a': expected"),
    (["value", "--stage", "warm", "--candidate", "math", "--fraction", "0"], "--fraction 0.0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    recipe = write_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["mix", args[0], str(recipe), *args[1:]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_mix_is_listed():
    result = CliRunner().invoke(app, ["mix", "--help"])
    assert result.exit_code == 0 and "search" in result.output and "value" in result.output
