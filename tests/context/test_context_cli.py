"""`midtrain rope show` and the run-time RoPE check against the base's rotary spec, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.config.test_recipe_cli_errors import GOOD


def _midtrain(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midtrain", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_rope_show_prints_the_table_and_plots(tmp_path):
    plot = tmp_path / "rope.png"
    out = _midtrain("rope", "show", "--method", "yarn,linear", "--factor", "4", "--head-dim", "16", "--original",
                    "128", "--param", "beta_fast=4", "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    assert "[yarn]" in out.stdout and "[linear]" in out.stdout and "attention_factor 1.13863" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2 * 8  # d/2 = 8 frequency pairs per method
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_rope_show_bad_input_is_a_clear_error():
    for args, fragment in ((["--method", "pi"], "unknown RoPE method 'pi'"),
                           (["--param", "beta_fast=x"], "--param beta_fast"),
                           (["--param", "beta_fast"], "expected KEY=VALUE")):
        out = _midtrain("rope", "show", *args)
        assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_run_refuses_rope_that_does_not_fit_the_base_before_training(tmp_path):
    (tmp_path / "prose.jsonl").write_text('{"text": "hello world"}\n' * 50)
    (tmp_path / "math.jsonl").write_text('{"text": "1 + 1 = 2"}\n' * 50)
    text = GOOD.replace("    tokens: 32k", "    rope: {method: longrope, factor: 2, short_factor: [1, 1, 1], "
                        "long_factor: [1, 2, 3], original_max_position_embeddings: 64}\n    tokens: 32k")
    (tmp_path / "recipe.yaml").write_text(text + "run_dir: run\n")
    out = _midtrain("run", "recipe.yaml", cwd=tmp_path)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "stages.anneal.rope.short_factor" in out.stderr and "one per rotated dimension pair" in out.stderr
    assert not list((tmp_path / "run").glob("stages/*/ckpt*"))  # nothing trained
