"""A tiny two-stage recipe and corpus for trainer tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

RECIPE = """\
base: preset:tiny-llama
tokenizer: bytes
seed: 3
precision: fp32
sources:
  - {{name: prose, path: prose.jsonl, domain: general, holdout_docs: 4}}
  - {{name: math, path: math.jsonl, holdout_docs: 4}}
checkpoint: {{every_tokens: {every}, keep_last: 2}}
stages:
  - name: warm
    init: scratch
    tokens: {warm_tokens}
    seq_len: 64
    batch: {{tokens: 512, micro: 4}}
    schedule: {{kind: constant, peak_lr: 3e-3, warmup_tokens: 1024}}
    data: {{mixture: {{prose: 1}}}}
    eval: {{every_tokens: 2048, max_docs: 4}}
  - name: anneal
    init: weights+optimizer
    start_lr: from_previous
    tokens: {anneal_tokens}
    seq_len: 64
    batch: {{tokens: 512, micro: 4}}
    schedule: {{kind: wsd, decay_fraction: 1.0, decay_shape: linear, min_lr: 0}}
    data: {{mixture: {{prose: 0.3, math: 0.7}}}}
    eval: {{max_docs: 4}}
"""


def write_corpus(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the a model data token learns stage mixture anneal context long short rope loss".split()
    with open(root / "prose.jsonl", "w") as fh:
        for _ in range(200):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
            fh.write(json.dumps({"text": text}) + "\n")
    with open(root / "math.jsonl", "w") as fh:
        for _ in range(200):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            fh.write(json.dumps({"text": f"{a} + {b} = {a + b}"}) + "\n")


def write_recipe(root: Path, *, warm_tokens: int = 4096, anneal_tokens: int = 2048, every: int = 1024) -> Path:
    write_corpus(root)
    path = root / "recipe.yaml"
    path.write_text(RECIPE.format(warm_tokens=warm_tokens, anneal_tokens=anneal_tokens, every=every))
    return path


def midtrain(*args: str, cache: Path, check: bool = True, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIDTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "midtrain", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"midtrain {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]
