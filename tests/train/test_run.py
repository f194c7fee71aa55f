"""A two-stage recipe end to end: LR hand-over, optimizer carry-over, HF exports that plain transformers reproduces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ..test_contracts import documented_metric_key
from .tiny import midtrain, train_rows, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root)
    result = midtrain("run", str(recipe), "--set", f"run_dir={root / 'out'}", cache=root / "cache")
    return root / "out", result


def test_run_writes_the_run_dir_contract(finished_run):
    run_dir, _ = finished_run
    for path in ["recipe.yaml", "plan.json", "metrics.jsonl", "eval/warm-before.json", "eval/warm.json",
                 "eval/anneal-before.json", "eval/anneal.json", "stages/warm/hf/config.json",
                 "stages/anneal/hf/model.safetensors", "stages/anneal/hf/tokenizer.json"]:
        assert (run_dir / path).exists(), path
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 8 warm + 4 anneal steps, global numbering
    assert rows[-1]["tokens"] == 12 * 512
    # Final checkpoints of both stages are kept (keep_last prunes only mid-stage ones).
    assert (run_dir / "checkpoints/warm/step-8/manifest.json").is_file()
    assert (run_dir / "checkpoints/anneal/step-12/manifest.json").is_file()
    assert not (run_dir / "checkpoints/warm/step-2").exists()  # pruned: keep_last 2 -> steps 6, 8 remain


def test_stage_two_starts_at_the_previous_last_lr_and_decays_to_zero(finished_run):
    run_dir, _ = finished_run
    rows = train_rows(run_dir)
    warm, anneal = [r for r in rows if r["stage"] == "warm"], [r for r in rows if r["stage"] == "anneal"]
    assert anneal[0]["lr"] == warm[-1]["lr"] == 3e-3
    assert anneal[-1]["lr"] == 0.0
    assert [r["lr"] for r in anneal] == pytest.approx([3e-3, 2e-3, 1e-3, 0.0])


def test_optimizer_state_is_carried_into_stage_two(finished_run):
    run_dir, _ = finished_run
    state = torch.load(run_dir / "checkpoints/anneal/step-12/optimizer.pt", weights_only=False)
    steps = {float(s["step"]) for s in state["state"].values()}
    assert steps == {12.0}  # AdamW's counter continued from warm's 8 (init: weights+optimizer)


def test_losses_fall_and_eval_files_follow_the_schema(finished_run):
    run_dir, _ = finished_run
    before = json.loads((run_dir / "eval/anneal-before.json").read_text())
    after = json.loads((run_dir / "eval/anneal.json").read_text())
    assert before["when"] == "before" and after["when"] == "after"
    assert before["step"] == 8 and after["step"] == 12
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_at = {r["step"]: r["tokens"] for r in rows if r["event"] == "train"}
    assert before["tokens"] == tokens_at[8] and after["tokens"] == tokens_at[12]  # the run's, not a batch's
    assert set(after["metrics"]) >= {"loss", "ppl", "loss.general", "ppl.general", "loss.math", "ppl.math"}
    warm_before = json.loads((run_dir / "eval/warm-before.json").read_text())["metrics"]
    assert after["metrics"]["loss"] < warm_before["loss"]
    assert after["metrics"]["loss.math"] < before["metrics"]["loss.math"]  # annealed on math
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["event"] == "val"]
    assert val and all("val_loss.general" in r for r in val)
    undocumented = {k for r in rows if r["event"] in ("train", "val") for k in r if not documented_metric_key(k)}
    assert not undocumented, f"metrics keys missing from docs/CONTRACTS.md §3: {undocumented}"


def test_exports_reload_in_a_fresh_process_with_the_trainers_logits(finished_run):
    run_dir, _ = finished_run
    code = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
for path in sys.argv[1:]:
    probe = load_file(path + "/midtrain_probe.safetensors")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    print(path, torch.equal(logits, probe["logits"]), model.config.use_cache)
"""
    paths = [str(run_dir / "stages" / s / "hf") for s in ("warm", "anneal")]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split().count("True") == 4, out.stdout  # exact logits + use_cache restored, both stages
    warm, anneal = (load_file(p + "/midtrain_probe.safetensors")["logits"] for p in paths)
    assert not torch.equal(warm, anneal)  # the probe can tell stages apart


def test_rerun_of_a_finished_run_skips_every_stage(finished_run, tmp_path):
    run_dir, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_text()
    recipe = run_dir / "recipe.yaml"
    result = midtrain("run", str(recipe), cache=tmp_path / "cache",
                      cwd=run_dir.parent)  # recipe.yaml holds absolute source paths and run_dir
    assert "already finished" in result.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_changed_recipe_over_trained_stages_is_refused(finished_run, tmp_path):
    run_dir, _ = finished_run
    result = midtrain("run", str(run_dir / "recipe.yaml"), "--set", "stages.warm.schedule.peak_lr=1e-3",
                      cache=tmp_path / "cache", check=False)
    assert result.returncode == 1
    assert "stage 'warm' was trained with a different recipe" in result.stderr
    assert "Traceback" not in result.stderr


def test_zero_start_lr_from_previous_is_warned(tmp_path):
    recipe = write_recipe(tmp_path)
    text = recipe.read_text().replace("kind: constant, peak_lr: 3e-3, warmup_tokens: 1024",
                                      "kind: wsd, peak_lr: 3e-3, warmup_tokens: 1024, decay_fraction: 0.5")
    recipe.write_text(text)
    result = midtrain("recipe", "check", str(recipe), cache=tmp_path / "cache")
    assert "start_lr from_previous is 0" in result.stdout


def test_a_local_hf_checkpoint_as_base_behaves_like_the_run_that_made_it(finished_run, tmp_path):
    """base: <dir> + the base's own tokenizer: the new run's before-eval equals the source run's after-eval."""
    run_dir, _ = finished_run
    recipe = write_recipe(tmp_path)
    text = recipe.read_text().replace("base: preset:tiny-llama\ntokenizer: bytes\n",
                                      f"base: {run_dir / 'stages/anneal/hf'}\n")
    text = text.replace("    init: scratch\n", "")  # default for a checkpoint base: init: weights
    recipe.write_text(text)
    midtrain("run", str(recipe), "--set", f"run_dir={tmp_path / 'out'}", "--set", "stages.warm.tokens=512",
             "--set", "stages.anneal.tokens=512", cache=tmp_path / "cache")
    source = json.loads((run_dir / "eval/anneal.json").read_text())["metrics"]
    before = json.loads((tmp_path / "out/eval/warm-before.json").read_text())
    assert before["checkpoint"].endswith("stages/anneal/hf")
    assert before["metrics"] == pytest.approx(source, rel=1e-6)


def test_special_tokens_grow_an_hf_bases_embeddings(finished_run, tmp_path):
    """A recipe that adds tokens to a checkpoint's tokenizer trains and exports with embeddings that fit it."""
    from transformers import AutoConfig, AutoTokenizer

    run_dir, _ = finished_run
    base = run_dir / "stages/anneal/hf"
    recipe = write_recipe(tmp_path)
    text = recipe.read_text().replace("base: preset:tiny-llama\ntokenizer: bytes\n",
                                      f"base: {base}\nspecial_tokens: ['<|user|>', '<|assistant|>']\n")
    recipe.write_text(text.replace("    init: scratch\n", ""))
    midtrain("run", str(recipe), "--set", f"run_dir={tmp_path / 'out'}", "--set", "stages.warm.tokens=512",
             "--set", "stages.anneal.tokens=512", cache=tmp_path / "cache")
    old_vocab = AutoConfig.from_pretrained(base).vocab_size
    exported = tmp_path / "out/stages/anneal/hf"
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert len(tokenizer) == old_vocab + 2 and tokenizer.convert_tokens_to_ids("<|assistant|>") == old_vocab + 1
    assert AutoConfig.from_pretrained(exported).vocab_size == old_vocab + 2
