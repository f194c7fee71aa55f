"""The README's recipe is a recipe: it loads, plans and passes the preflight (with a tiny preset base standing in for
/models/my-base), so the example a newcomer copies does not break silently (issue 24)."""

import re
from pathlib import Path

from midtrain.config import load_recipe
from midtrain.plan import build_plan
from midtrain.run import preflight

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_recipe_loads_plans_and_passes_preflight(tmp_path):
    [block] = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    (tmp_path / "data").mkdir()
    for name in ("web", "math"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"text": "a document"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(block)
    recipe = load_recipe(path, ["base=preset:tiny-llama", "tokenizer=bytes", f"run_dir={tmp_path / 'run'}"])
    plan = build_plan(recipe)
    assert [s.name for s in plan.stages] == ["stable", "anneal", "long"]
    assert plan.stages[1].lr_at_step(0) == plan.stages[0].last_lr  # start_lr: from_previous
    checks = preflight(recipe, plan)
    assert checks.problems == []
    assert recipe.stages[2].rope.method == "yarn"
