"""Integrity (issue 25): what midtrain reads back is verified, what it writes never destroys what it read, and every
hostile argument or path is one clear line — each case reproduced from the red-team report."""

from __future__ import annotations

import json
import shutil

import pytest

from midtrain.config import load_recipe
from midtrain.io import write_text_atomic
from midtrain.layout import RunLayout
from midtrain.model import build_model, load_model, preset_config, save_hf_checkpoint
from midtrain.model.verify import CheckpointFileError, verify_export

from ..train.tiny import midtrain, train_rows, write_recipe


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny two-stage recipe run to the end once; tests work on copies of its run dir."""
    root = tmp_path_factory.mktemp("integrity")
    recipe = write_recipe(root)
    midtrain("run", str(recipe), "--set", f"run_dir={root / 'run'}", cache=root / "cache")
    return root, recipe


def _copy(finished, tmp_path):
    root, recipe = finished
    shutil.copytree(root / "run", tmp_path / "run")
    return recipe, ("--set", f"run_dir={tmp_path / 'run'}"), root / "cache"


def _rows(run_dir):
    return [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_damaged_finished_export_is_detected_and_exported_again(finished, tmp_path):
    recipe, args, cache = _copy(finished, tmp_path)
    export = RunLayout(tmp_path / "run").stage("warm").export
    original = _files(export)
    weights = bytearray((export / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF  # one flipped byte in the weights: loadable, silently wrong without a checksum
    (export / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointFileError, match=r"warm/hf/model.safetensors: checksum mismatch"):
        verify_export(export)
    rows_before = _rows(tmp_path / "run")
    again = midtrain("run", str(recipe), *args, cache=cache)
    assert "model.safetensors: checksum mismatch" in again.stdout
    assert "exporting stage 'warm' again from its final checkpoint" in again.stdout
    assert _files(export) == original  # the final checkpoint re-exports the same bytes
    rows = _rows(tmp_path / "run")
    assert rows[: len(rows_before)] == rows_before  # nothing recorded was lost
    assert [r["event"] for r in rows[len(rows_before):]] == ["resume", "reexport"]


def test_a_resume_never_deletes_a_later_stages_history(finished, tmp_path):
    """stages/warm/hf removed after stage anneal trained: warm is re-exported, anneal's rows all stay."""
    recipe, args, cache = _copy(finished, tmp_path)
    layout = RunLayout(tmp_path / "run")
    shutil.rmtree(layout.stage("warm").export)
    anneal_rows = [r for r in _rows(layout.root) if r["stage"] == "anneal"]
    midtrain("run", str(recipe), *args, cache=cache)
    kept = [r for r in _rows(layout.root) if r["stage"] == "anneal"]
    assert kept[: len(anneal_rows)] == anneal_rows and any(r["event"] == "stage_start" for r in kept)
    assert len(train_rows(layout.root)) == len(train_rows(finished[0] / "run"))
    assert verify_export(layout.stage("warm").export) is None


@pytest.fixture()
def saved_model(tmp_path):
    model = build_model(preset_config("tiny-llama", vocab_size=300), seed=0)
    return save_hf_checkpoint(model, None, tmp_path / "ckpt")


def test_a_truncated_safetensors_file_is_one_error_naming_it(saved_model):
    weights = saved_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointFileError, match=rf"^{weights}: truncated"):
        load_model(saved_model)


def test_an_invalid_config_and_a_vocab_mismatch_name_config_json(saved_model):
    config = saved_model / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointFileError, match=rf"^{config}: not valid JSON"):
        load_model(saved_model)
    data = json.loads(text)
    data["vocab_size"] = 512
    config.write_text(json.dumps(data))
    with pytest.raises(CheckpointFileError, match=rf"^{config}: vocab_size 512 but model.safetensors has an "
                                                  "embedding of 300 rows"):
        load_model(saved_model)


def test_a_run_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    recipe = write_recipe(tmp_path)
    (tmp_path / "taken").write_text("not a directory")
    for verb in (("recipe", "check"), ("run",)):
        result = midtrain(*verb, str(recipe), "--set", f"run_dir={tmp_path / 'taken'}", cache=tmp_path / "c",
                          check=False)
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr
        assert f"run_dir: {tmp_path / 'taken'}: exists and is not a directory" in result.stderr
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_changed_recipe_refusal_names_the_keys_that_changed(finished, tmp_path):
    recipe, args, cache = _copy(finished, tmp_path)
    result = midtrain("run", str(recipe), *args, "--set", "stages.warm.tokens=8192", cache=cache, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "changed: stages.warm.tokens (4096 -> 8192)" in result.stderr


def test_edited_data_between_resumes_names_the_file_and_the_remedy(tmp_path):
    recipe = write_recipe(tmp_path, warm_tokens=4096, anneal_tokens=2048)
    args = ("--set", f"run_dir={tmp_path / 'run'}")
    loaded = load_recipe(recipe, [args[1]])
    from midtrain.run import RunOptions, run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
        run(loaded.model_copy(update={"stages": loaded.stages[:1]}), RunOptions(progress=False))
    prose = tmp_path / "prose.jsonl"  # edited after the first stage read it
    prose.write_text(prose.read_text() + json.dumps({"text": "an edited line"}) + "\n")
    result = midtrain("run", str(recipe), *args, "--force-recipe-change", cache=tmp_path / "cache", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "source 'prose'" in result.stderr and str(prose) in result.stderr
    assert "start a new run_dir" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (("--factor", "inf"), "--factor inf: must be a finite number >= 1"),
    (("--factor", "-4"), "--factor -4.0: must be a finite number >= 1"),
    (("--head-dim", "7"), "--head-dim 7: the rotated part"),
    (("--head-dim", "-64"), "--head-dim -64: the rotated part"),
    (("--base", "0"), "--base 0.0: must be a finite rope_theta > 1"),
    (("--partial-rotary-factor", "5"), "--partial-rotary-factor 5.0: must lie in (0, 1]"),
    (("--original", "0"), "--original 0: must be a positive number of tokens"),
    (("--plot", "/nonexistent-dir/x.png"), "--plot /nonexistent-dir/x.png: directory /nonexistent-dir does not"),
])
def test_rope_show_checks_every_number_at_the_edge(argv, message, tmp_path):
    result = midtrain("rope", "show", "--method", "linear", "--factor", "2", *argv, cache=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr


def test_eval_with_a_missing_data_file_is_one_line(finished, tmp_path):
    export = RunLayout(finished[0] / "run").stage("anneal").export
    result = midtrain("eval", str(export), "--tasks", "loss", "--data", str(tmp_path / "missing.jsonl"),
                      cache=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--data {tmp_path / 'missing.jsonl'}: no such file or directory" in " ".join(result.stderr.split())


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    (tmp_path / "target").mkdir()  # os.replace onto a directory fails after the temp file was written
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "target", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_report_survives_a_damaged_metrics_row(finished, tmp_path):
    recipe, args, cache = _copy(finished, tmp_path)
    layout = RunLayout(tmp_path / "run")
    with open(layout.metrics, "a") as fh:
        fh.write(json.dumps({"event": "train", "step": 999}) + "\n")  # no tokens, no stage
    layout.report_md.unlink()
    result = midtrain("report", str(layout.root), cache=cache)
    assert "report:" in result.stdout and "Traceback" not in result.stderr
    assert "anneal" in layout.report_md.read_text()


def test_a_garbage_lock_file_is_replaced_with_a_note(finished, tmp_path):
    recipe, args, cache = _copy(finished, tmp_path)
    RunLayout(tmp_path / "run").lock.write_text('{"pid": "not a pid"')
    result = midtrain("run", str(recipe), *args, cache=cache)
    assert "note: replaced an unreadable lock file" in result.stdout
    assert not RunLayout(tmp_path / "run").lock.exists()


def test_a_changed_token_cache_is_detected_and_tokenized_again(tmp_path, caplog):
    from midtrain.data import byte_tokenizer, tokenize_source

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document number {i} " * 8}) + "\n" for i in range(30)))
    first = tokenize_source("docs", data, "text", byte_tokenizer(), holdout_docs=2, cache_dir=tmp_path / "cache")
    original = (first.directory / "tokens.bin").read_bytes()
    assert "files" in first.meta and first.meta["files"]["tokens.bin"]["bytes"] == len(original)
    damaged = bytearray(original)
    damaged[10] ^= 0x01  # same size: only a checksum sees it
    (first.directory / "tokens.bin").write_bytes(bytes(damaged))
    with caplog.at_level("WARNING", logger="midtrain"):
        again = tokenize_source("docs", data, "text", byte_tokenizer(), holdout_docs=2, cache_dir=tmp_path / "cache")
    assert "tokens.bin: checksum mismatch" in caplog.text and "re-tokenizing source 'docs'" in caplog.text
    assert not again.cache_hit and (again.directory / "tokens.bin").read_bytes() == original
    caplog.clear()
    with caplog.at_level("WARNING", logger="midtrain"):
        third = tokenize_source("docs", data, "text", byte_tokenizer(), holdout_docs=2, cache_dir=tmp_path / "cache")
    assert third.cache_hit and "mismatch" not in caplog.text
