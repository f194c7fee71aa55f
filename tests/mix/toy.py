"""A tiny three-source, two-stage recipe for the mixture tools (seconds per proxy on 2 CPU cores)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.train import tiny

RECIPE = """\
base: preset:tiny-llama
tokenizer: bytes
seed: 3
precision: fp32
sources:
  - {{name: prose, path: prose.jsonl, domain: general, holdout_docs: 4}}
  - {{name: math, path: math.jsonl, holdout_docs: 4}}
  - {{name: code, path: code.jsonl, holdout_docs: 4}}
stages:
  - name: warm
    tokens: {warm_tokens}
    seq_len: 64
    batch: {{tokens: 512}}
    schedule: {{kind: constant, peak_lr: 3e-3, warmup_tokens: 1024}}
    data: {{mixture: {{prose: 0.5, math: 0.2, code: 0.3}}}}
    eval: {{max_docs: 4}}
  - name: anneal
    init: weights+optimizer
    start_lr: from_previous
    tokens: {anneal_tokens}
    seq_len: 64
    batch: {{tokens: 512}}
    schedule: {{kind: wsd, decay_fraction: 1.0, min_lr: 0}}
    data: {{mixture: {{prose: 0.6, code: 0.4}}, replay: {{fraction: 0.25}}}}
    eval: {{max_docs: 4}}
"""


def write_corpus(root: Path, seed: int = 0) -> None:
    """The trainer tests' prose and math sources plus a code source."""
    tiny.write_corpus(root, seed)
    rng = random.Random(seed)
    idents = "x y total count item value result index".split()
    with open(root / "code.jsonl", "w") as fh:
        for _ in range(200):
            v, w = rng.choice(idents), rng.choice(idents)
            fh.write(json.dumps({"text": f"def f({v}):\n    {w} = {v} * {rng.randint(2, 9)}\n    return {w}\n"}) + "\n")


def write_recipe(root: Path, *, warm_tokens: int = 4096, anneal_tokens: int = 2048) -> Path:
    write_corpus(root)
    path = root / "recipe.yaml"
    path.write_text(RECIPE.format(warm_tokens=warm_tokens, anneal_tokens=anneal_tokens))
    return path
