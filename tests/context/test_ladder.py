"""recipes/ladder.yaml, shrunk to a few steps per stage, end to end through `midtrain.run.driver.run`.

Checks per stage: the HF export carries the stage's own RoPE (rope_parameters, max_position_embeddings, and the
rotary frequencies plain transformers rebuilds from them), and stage k+1 starts from stage k's export with stage
k+1's RoPE applied (its before-eval is re-computed from that export as the oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from midtrain.config import load_recipe
from midtrain.context import RotarySpec, apply_rope, compute
from midtrain.eval.heldout import heldout_metrics, pack_documents
from midtrain.model import forward_packed, load_model
from midtrain.run import RunOptions, run

LADDER = Path(__file__).resolve().parents[2] / "recipes" / "ladder.yaml"
# (seq_len, batch tokens, tokens) per stage: 2-3 optimizer steps each.
SHRINK = {"short": (128, 512, 1024), "ctx256": (256, 512, 1024), "ctx512": (512, 1024, 2048)}
EXPECTED = {  # hand-written from docs/ROPE.md's export rules: the oracle for each stage's config.json
    "short": ({"rope_type": "default", "rope_theta": 10000.0}, 2048),  # the preset's own
    "ctx256": ({"rope_type": "default", "rope_theta": 40000.0}, 2048),  # ABF: new theta, length not read
    "ctx512": ({"rope_type": "yarn", "rope_theta": 40000.0, "factor": 2, "original_max_position_embeddings": 256,
                "beta_fast": 8, "beta_slow": 1, "truncate": True}, 512),  # YaRN keeps the ABF base; s * L0
}


def test_the_ladder_recipe_checks_clean():
    recipe = load_recipe(LADDER)
    assert [s.seq_len for s in recipe.stages] == [128, 256, 512]
    assert [s.rope for s in recipe.stages][1:] == [
        {"method": "abf", "rope_theta": "4e4"},
        {"method": "yarn", "factor": 2, "original_max_position_embeddings": 256, "beta_fast": 8},
    ]


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    overrides = [f"run_dir={root / 'run'}", "precision=fp32", "checkpoint.every_tokens=1M"]
    for name, (_, batch, tokens) in SHRINK.items():
        overrides += [f"stages.{name}.tokens={tokens}", f"stages.{name}.batch.tokens={batch}",
                      f"stages.{name}.schedule.warmup_tokens={batch}", f"stages.{name}.eval.every_tokens=null"]
    recipe = load_recipe(LADDER, overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; on shared cores 2 OpenMP threads can be 10x slower
    mp = pytest.MonkeyPatch()
    mp.setenv("MIDTRAIN_CACHE", str(root / "cache"))
    try:
        ctx = run(recipe, RunOptions(progress=False))
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return recipe, ctx, root / "run"


def test_each_stage_exports_its_own_rope(ladder_run):
    recipe, _, run_dir = ladder_run
    for name, (rope_parameters, max_pos) in EXPECTED.items():
        config = json.loads((run_dir / "stages" / name / "hf" / "config.json").read_text())
        assert config["rope_parameters"] == rope_parameters, name
        assert config["max_position_embeddings"] == max_pos, name
    # Plain transformers rebuilds the last stage's frequencies = YaRN over the ABF base (oracle: rope.compute).
    model = AutoModelForCausalLM.from_pretrained(run_dir / "stages/ctx512/hf")
    spec = RotarySpec(head_dim=64, base=4e4, original_max_position_embeddings=256)
    inv, attn = compute("yarn", spec, {"factor": 2, "beta_fast": 8})
    assert torch.equal(model.model.rotary_emb.inv_freq, inv)
    assert model.model.rotary_emb.attention_scaling == attn
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = {r["stage"]: r for r in steps if r["event"] == "stage_start"}
    assert [starts[n]["init"] for n in SHRINK] == ["scratch", "weights", "weights"]


def test_each_stage_starts_from_the_previous_export(ladder_run):
    recipe, ctx, run_dir = ladder_run
    names = list(SHRINK)
    for k in (1, 2):
        before = json.loads((run_dir / "eval" / f"{names[k]}-before.json").read_text())
        previous = run_dir / "stages" / names[k - 1] / "hf"
        assert before["checkpoint"] == str(previous)
        model = load_model(previous)
        apply_rope(model, recipe.stages[k].rope)
        docs = [(d, i) for i, s in enumerate(ctx.sources) for d in s.holdout_docs()[: recipe.stages[k].eval.max_docs]]
        metrics = heldout_metrics(model, forward_packed, pack_documents(docs, SHRINK[names[k]][0]), ctx.domains,
                                  device=torch.device("cpu"), precision="fp32")
        assert metrics == pytest.approx(before["metrics"], rel=1e-5), names[k]
        after_previous = json.loads((run_dir / "eval" / f"{names[k - 1]}.json").read_text())
        assert after_previous["step"] == before["step"]  # global step numbering continues across the ladder
