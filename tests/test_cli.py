"""The command line lists its verbs and fails cleanly."""

from __future__ import annotations

import subprocess
import sys


def _midtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midtrain", *args], capture_output=True, text=True, timeout=60)


def test_help_lists_the_verbs():
    out = _midtrain("--help")
    assert out.returncode == 0
    for verb in ("run", "demo", "recipe", "rope"):
        assert verb in out.stdout
    assert "check" in _midtrain("recipe", "--help").stdout


def test_run_without_a_recipe_is_a_usage_error():
    out = _midtrain("run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
