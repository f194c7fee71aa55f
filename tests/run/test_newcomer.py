"""What a newcomer hit (issue 24): a quiet console, a false LR warning, silent repetition, oversized hold-outs."""

from __future__ import annotations

import json

from midtrain.config import load_recipe
from midtrain.data import byte_tokenizer
from midtrain.data.prepare import data_warnings, tokenize_recipe_sources
from midtrain.plan import build_plan

from ..train.tiny import midtrain, write_recipe


def test_run_shows_data_progress_validation_rows_and_no_third_party_warnings(tmp_path):
    recipe = write_recipe(tmp_path, warm_tokens=4096, anneal_tokens=1024)
    result = midtrain("run", str(recipe), "--set", f"run_dir={tmp_path / 'run'}", cache=tmp_path / "c")
    assert "data: source 'prose': " in result.stdout and "data: source 'math': " in result.stdout
    assert "warm val step 4: loss " in result.stdout  # eval.every_tokens 2048 = every 4 steps of 512 tokens
    assert "FutureWarning" not in result.stderr and "Warning" not in result.stdout


def test_from_previous_at_zero_warns_only_without_warm_up(tmp_path):
    path = write_recipe(tmp_path)
    decayed = ["stages.warm.schedule={kind: wsd, peak_lr: 3e-3, decay_fraction: 1.0, min_lr: 0}",
               "stages.anneal.schedule={kind: wsd, decay_fraction: 1.0, min_lr: 0}"]
    plan = build_plan(load_recipe(path, decayed))
    assert any("trains at LR 0" in w for w in plan.warnings)
    warmed = [decayed[0], "stages.anneal.start_lr=null",
              "stages.anneal.schedule={kind: wsd, peak_lr: 1e-3, warmup_tokens: 512, decay_fraction: 1.0, min_lr: 0}"]
    assert not any("trains at LR 0" in w for w in build_plan(load_recipe(path, warmed)).warnings)
    from_previous_warmed = [decayed[0], "stages.anneal.schedule={kind: wsd, peak_lr: 1e-3, warmup_tokens: 512, "
                            "decay_fraction: 1.0, min_lr: 0}"]
    assert not any("trains at LR 0" in w for w in build_plan(load_recipe(path, from_previous_warmed)).warnings)


def test_repetition_and_large_hold_outs_are_said_before_training(tmp_path):
    path = write_recipe(tmp_path, warm_tokens=4096, anneal_tokens=65536)  # math: 200 tiny documents, read many times
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(10)))
    recipe = load_recipe(path, [f"run_dir={tmp_path / 'run'}",
                                f"sources=[{{name: prose, path: {tmp_path / 'prose.jsonl'}, holdout_docs: 4}}, "
                                f"{{name: math, path: {tmp_path / 'math.jsonl'}, holdout_docs: 4}}, "
                                f"{{name: small, path: {small}, holdout_docs: 4}}]"])
    sources = tokenize_recipe_sources(recipe, byte_tokenizer(), cache_dir=tmp_path / "cache")
    warnings = data_warnings(recipe, sources)
    assert any(w.startswith("source 'math' repeats: ") and "by the end of stage 'anneal'" in w for w in warnings)
    assert any(w.startswith("source 'small': 4 of its 10 documents are held out") for w in warnings)
    assert not any("'prose': " in w and "held out" in w for w in warnings)
