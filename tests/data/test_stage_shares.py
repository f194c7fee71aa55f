"""Realized token shares per source over each stage of a two-stage recipe (pre-anneal; anneal with 20% replay)
are within 0.5 percentage points of the plan, counted from the emitted batches' source ids."""

from __future__ import annotations

import json

import pytest
import torch

from midtrain.config import load_recipe
from midtrain.data import PackedLoader, byte_tokenizer
from midtrain.data.prepare import tokenize_recipe_sources

from .corpus import prose_texts, random_texts, write_jsonl

STAGE = ("{{name: {name}, tokens: {tokens}, seq_len: 256, batch: {{tokens: 2048}}, schedule: {{kind: constant, "
         "peak_lr: 1e-3}}, data: {data}}}")


def test_two_stage_shares_with_replay_match_the_plan(tmp_path):
    write_jsonl(tmp_path / "prose.jsonl", prose_texts(300))
    write_jsonl(tmp_path / "code.jsonl", random_texts(300, seed=1, lo=50, hi=900))
    write_jsonl(tmp_path / "math.jsonl", [f"{i} * {i + 7} = {i * (i + 7)}. " * (1 + i % 5) for i in range(300)])
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"prompt": f"Add {i} and {2 * i}.", "response": f"{i} + {2 * i} = {3 * i}."}) + "\n")
    stages = [STAGE.format(name="pre", tokens="400K", data="{mixture: {prose: 0.6, code: 0.3, math: 0.09, "
                                                          "chat: 0.01}}"),
              STAGE.format(name="anneal", tokens="300K", data="{mixture: {math: 0.5, code: 0.3, chat: 0.2}, "
                                                             "replay: {fraction: 0.2}}")]
    (tmp_path / "r.yaml").write_text(
        "base: preset:tiny-llama\ntokenizer: bytes\nsources:\n"
        "  - {name: prose, path: prose.jsonl, domain: general}\n  - {name: code, path: code.jsonl}\n"
        "  - {name: math, path: math.jsonl}\n  - {name: chat, path: chat.jsonl, type: instruction, template: simple}\n"
        "stages:\n  - " + "\n  - ".join(stages) + "\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    sources = {s.name: s for s in tokenize_recipe_sources(recipe, byte_tokenizer(), cache_dir=tmp_path / "cache")}
    cursors: dict = {}
    for i, stage in enumerate(recipe.stages):
        plan = recipe.effective_mixture(i)
        if i == 1:  # (1 - 0.2) * own + 0.2 * pre's mixture
            assert plan == pytest.approx({"prose": 0.12, "code": 0.3, "math": 0.418, "chat": 0.162})
        names = sorted(plan)
        loader = PackedLoader([sources[n] for n in names], [plan[n] for n in names], seq_len=stage.seq_len,
                              global_batch_seqs=stage.seqs_per_step, seed=recipe.seed)
        loader.load_source_cursors({k: v for k, v in cursors.items() if k in plan})
        counts = torch.zeros(len(names), dtype=torch.float64)
        for _ in range(stage.steps):
            for mb in loader.next_step():
                counts += torch.bincount(mb["source_ids"].ravel(), minlength=len(names)).double()
        assert counts.sum() == stage.steps * stage.batch.tokens
        for n, got in zip(names, (counts / counts.sum()).tolist()):
            assert abs(got - plan[n]) < 0.005, (stage.name, n, got, plan[n])
        cursors.update(loader.source_cursors())
