#!/usr/bin/env bash
# GPU smoke test of the CUDA path (run on a GPU machine from the repo root): a two-stage run with precision auto
# (bf16-mixed on GPUs), kill-free resume of a finished run, then the trainer tests. Prints what it measured.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-}:$PWD/src" PYTHONUNBUFFERED=1 MIDTRAIN_CACHE=/tmp/mtcache
work=$(mktemp -d)
python3 - "$work" <<'PY'
import sys, pathlib
sys.path.insert(0, "tests/train")
from tiny import write_recipe
root = pathlib.Path(sys.argv[1])
recipe = write_recipe(root, warm_tokens=64 * 4096, anneal_tokens=32 * 4096, every=16 * 4096)
text = recipe.read_text().replace("precision: fp32", "precision: auto").replace("preset:tiny-llama", "preset:small-llama")
text = text.replace("seq_len: 64", "seq_len: 1024").replace("batch: {tokens: 512, micro: 4}", "batch: {tokens: 4096, micro: 4}")
recipe.write_text(text)
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m midtrain run "$work/recipe.yaml" --set run_dir="$work/out" 2>&1 | tail -25
python3 - "$work/out" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in rows if r["event"] == "train"]
print("steps", len(train), "first loss", round(train[0]["loss"], 4), "last loss", round(train[-1]["loss"], 4))
print("median tok/s", round(statistics.median(r["tokens_per_s"] for r in train[5:])))
PY
python3 -m pytest -q -x tests/train/test_run.py tests/train/test_checkpoint.py tests/train/test_resume.py 2>&1 | tail -15
