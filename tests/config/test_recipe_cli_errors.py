"""Bad recipes through the real CLI: exit code 2, `FILE:LINE: field.path: message`, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """\
base: preset:tiny-llama
tokenizer: bytes
sources:
  - name: prose
    path: prose.jsonl
  - name: math
    path: math.jsonl
stages:
  - name: warmup
    tokens: 64k
    seq_len: 128
    batch: {tokens: 4096}
    schedule: {kind: constant, peak_lr: 1e-3, warmup_tokens: 8192}
    data: {mixture: {prose: 1}}
  - name: anneal
    init: weights+optimizer
    start_lr: from_previous
    tokens: 32k
    seq_len: 128
    batch: {tokens: 4096}
    schedule: {kind: wsd, decay_fraction: 1.0}
    data: {mixture: {prose: 0.3, math: 0.7}}
"""


def _cli(tmp_path: Path, text: str, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "prose.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "math.jsonl").write_text('{"text": "1 + 1 = 2"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    args = [sys.executable, "-m", "midtrain", "recipe", "check", str(recipe)]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_good_recipe_passes_and_prints_plan(tmp_path):
    result = _cli(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert "warmup" in result.stdout and "anneal" in result.stdout
    # anneal starts at warmup's last LR (constant 1e-3) and decays to 0.
    assert "0.001" in result.stdout


# (name, recipe text, overrides, expected field path, text the message must contain, line anchor or None)
CASES = [
    ("unknown_top_key", GOOD.replace("tokenizer: bytes", "tokenizer: bytes\nlearning_rate: 3"), [],
     "learning_rate", "unknown key", "learning_rate: 3"),
    ("fp16_rejected", GOOD.replace("tokenizer: bytes", "tokenizer: bytes\nprecision: fp16"), [],
     "precision", "fp16", "precision: fp16"),
    ("bad_token_count", GOOD.replace("tokens: 64k", "tokens: lots"), [],
     "stages.warmup.tokens", "token count", "tokens: lots"),
    ("batch_not_multiple_of_seq_len", GOOD.replace("batch: {tokens: 4096}\n    schedule: {kind: constant",
                                                   "batch: {tokens: 4000}\n    schedule: {kind: constant"), [],
     "stages.warmup.batch.tokens", "multiple of seq_len", "batch: {tokens: 4000}"),
    ("unknown_schedule_kind", GOOD.replace("kind: constant", "kind: triangle"), [],
     "stages.warmup.schedule.kind", "constant", "kind: triangle"),
    ("unknown_decay_shape", GOOD.replace("decay_fraction: 1.0}", "decay_fraction: 1.0, decay_shape: cubic}"), [],
     "stages.anneal.schedule.decay_shape", "1-sqrt", "decay_shape: cubic"),
    ("from_previous_in_first_stage", GOOD.replace("    tokens: 64k", "    start_lr: from_previous\n    tokens: 64k"),
     [], "stages.warmup.start_lr", "previous stage", "start_lr: from_previous"),
    ("optimizer_state_in_first_stage", GOOD.replace("  - name: warmup\n", "  - name: warmup\n    init: weights+optimizer\n"),
     [], "stages.warmup.init", "optimizer state", "init: weights+optimizer\n    tokens: 64k"),
    ("unknown_source_in_mixture", GOOD.replace("{prose: 0.3, math: 0.7}", "{prose: 0.3, code: 0.7}"), [],
     "stages.anneal.data.mixture.code", "unknown source", "{prose: 0.3, code: 0.7}"),
    ("stage_name_with_slash", GOOD.replace("name: anneal", "name: ../anneal"), [],
     "stages.1.name", "names may use", "name: ../anneal"),
    ("duplicate_stage_names", GOOD.replace("name: anneal", "name: warmup"), [],
     "stages.warmup.name", "duplicate", None),
    ("missing_source_file", GOOD.replace("path: math.jsonl", "path: nowhere/math.jsonl"), [],
     "sources.math.path", "does not exist", "path: nowhere/math.jsonl"),
    ("missing_required_key", GOOD.replace("    seq_len: 128\n    batch: {tokens: 4096}\n    schedule: {kind: constant",
                                          "    batch: {tokens: 4096}\n    schedule: {kind: constant"), [],
     "stages.warmup.seq_len", "missing", "- name: warmup"),
    ("negative_lr_by_override", GOOD, ["stages.warmup.schedule.peak_lr=-1"],
     "stages.warmup.schedule.peak_lr", "set by --set", None),
    ("override_names_unknown_stage", GOOD, ["stages.cooldown.tokens=2e6"],
     "stages.cooldown.tokens", "no entry named 'cooldown'", None),
    ("peak_conflicts_with_start", GOOD.replace("decay_fraction: 1.0}", "decay_fraction: 1.0, peak_lr: 0.5}"), [],
     "stages.anneal.start_lr", "conflicts with schedule.peak_lr", "start_lr: from_previous"),
    ("rope_dynamic_for_training", GOOD.replace("    tokens: 32k", "    rope: {method: dynamic, factor: 4}\n    tokens: 32k"),
     [], "stages.anneal.rope.method", "inference-only", "rope: {method: dynamic"),
    ("rope_unknown_parameter", GOOD.replace("    tokens: 32k", "    rope: {method: yarn, factor: 2, beta_fats: 4}\n"
                                                               "    tokens: 32k"),
     [], "stages.anneal.rope.beta_fats", "not a parameter of method 'yarn'", "rope: {method: yarn"),
    ("rope_factor_below_one", GOOD.replace("    tokens: 32k", "    rope: {method: linear, factor: 0.5}\n    tokens: 32k"),
     [], "stages.anneal.rope.factor", "must be >= 1", "rope: {method: linear"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_is_a_clear_error(tmp_path, case):
    _, text, overrides, field, fragment, anchor = case
    result = _cli(tmp_path, text, *overrides)
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert "recipe.yaml" in err, err
    # --set errors may come before field validation; everything else names the field path.
    assert field in err, err
    assert fragment in err, err
    if anchor is not None:
        line = _line_of(text, anchor.splitlines()[0])
        assert f"recipe.yaml:{line}:" in err, (line, err)


def test_invalid_yaml_names_the_line(tmp_path):
    text = GOOD.replace("seq_len: 128\n    batch: {tokens: 4096}\n    schedule: {kind: constant",
                        "seq_len: 128\n    batch: {tokens: 4096\n    schedule: {kind: constant", 1)
    result = _cli(tmp_path, text)
    assert result.returncode == 2
    assert "invalid YAML" in result.stderr and "recipe.yaml:" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_recipe_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "midtrain", "recipe", "check", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_several_problems_are_all_reported(tmp_path):
    text = GOOD.replace("kind: constant", "kind: triangle").replace("tokens: 32k", "tokens: -5")
    result = _cli(tmp_path, text)
    assert result.returncode == 2
    assert "stages.warmup.schedule.kind" in result.stderr and "stages.anneal.tokens" in result.stderr


def test_a_schema_error_does_not_hide_missing_files_or_unknown_sources(tmp_path):
    """One `recipe check` lists a typo, a missing data file and an unknown source together, not in phases."""
    text = (GOOD.replace("kind: constant", "kind: triangle").replace("path: math.jsonl", "path: nowhere/math.jsonl")
            .replace("{prose: 0.3, math: 0.7}", "{prose: 0.3, code: 0.7}"))
    result = _cli(tmp_path, text)
    assert result.returncode == 2
    for field in ("stages.warmup.schedule.kind", "sources.math.path", "stages.anneal.data.mixture.code"):
        assert field in result.stderr, result.stderr
    assert f"recipe.yaml:{_line_of(text, 'path: nowhere')}:" in result.stderr


def test_override_by_stage_name_changes_the_plan(tmp_path):
    result = _cli(tmp_path, GOOD, "stages.anneal.tokens=2e5", "stages.anneal.batch.tokens=8192")
    assert result.returncode == 0, result.stderr
    # ceil(200000 / 8192) = 25 steps
    assert " 25 " in result.stdout or "│ 25 " in result.stdout, result.stdout


def test_plot_flag_writes_png(tmp_path):
    result = _cli(tmp_path, GOOD, )
    assert result.returncode == 0
    out = tmp_path / "lr.png"
    recipe = tmp_path / "recipe.yaml"
    done = subprocess.run([sys.executable, "-m", "midtrain", "recipe", "check", str(recipe), "--plot", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rope_factor_short_of_the_stage_length_is_a_warning(tmp_path):
    text = GOOD.replace("    tokens: 32k\n    seq_len: 128",
                        "    rope: {method: yarn, factor: 2, original_max_position_embeddings: 32}\n"
                        "    tokens: 32k\n    seq_len: 128")
    result = _cli(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stdout and "stage 'anneal': rope." in result.stdout, result.stdout
