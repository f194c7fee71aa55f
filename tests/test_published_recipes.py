"""Every recipe the project ships checks clean, and each published-recipe mirror says what it mirrors.

The OLMo 2 mirror also runs end to end, shrunk: it is the one that exercises the LR hand-over (start_lr from the
previous stage with the optimizer kept), an instruction source with prompt masking and an epoch cap in one stage.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from midtrain.config import load_recipe
from midtrain.run import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))  # the demo recipe needs the corpus `midtrain demo` builds: test_demo.py
PUBLISHED = sorted(ROOT.glob("recipes/published/*.yaml"))


def test_the_published_mirrors_are_all_there():
    names = {p.stem for p in PUBLISHED}
    assert {"olmo2_anneal", "llama3_long_context", "qwen_abf", "deepseek_v3_yarn", "minicpm_wsd"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_checks_clean(path: Path):
    recipe = load_recipe(path)
    assert recipe.stages


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_each_mirror_cites_its_source(path: Path):
    header = path.read_text().split("\nbase:", 1)[0]
    assert re.search(r"arXiv \d{4}\.\d{4,5}", header), f"{path.name}: the header comment must cite the paper"
    assert "REFERENCE.md" in header


def test_deepseek_mirror_temperature_is_the_published_formula():
    recipe = load_recipe(ROOT / "recipes/published/deepseek_v3_yarn.yaml")
    for stage in recipe.stages[1:]:
        s = stage.rope["factor"]
        assert stage.rope["attention_factor"] == pytest.approx(0.1 * math.log(s) + 1, abs=1e-4)


@pytest.mark.slow
def test_olmo2_mirror_runs_shrunk_with_lr_hand_over(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    shrink = []
    for name in ("pretrain", "anneal"):
        shrink += [f"stages.{name}.tokens=2048", f"stages.{name}.batch.tokens=1024"]
    recipe = load_recipe(ROOT / "recipes/published/olmo2_anneal.yaml",
                         [f"run_dir={tmp_path / 'run'}", "precision=fp32", *shrink,
                          "stages.pretrain.schedule.warmup_tokens=0", "stages.anneal.gate={}",
                          "stages.anneal.eval.tasks=[loss]", "stages.anneal.seeds=null"])  # branches: test_branches.py
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(recipe, RunOptions(progress=False))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "lr" in r and "loss" in r]
    pre = [r["lr"] for r in train if r["stage"] == "pretrain"]
    ann = [r["lr"] for r in train if r["stage"] == "anneal"]
    assert pre == [3e-3, 3e-3]
    assert ann == [pytest.approx(3e-3), 0.0]  # linear to 0 from where pre-training ended, no warm-up
    assert (tmp_path / "run" / "stages" / "anneal" / "hf" / "config.json").exists()
