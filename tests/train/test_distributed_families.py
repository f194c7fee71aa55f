"""FSDP2 and DDP on families beyond Llama, 2 gloo ranks against 1 process: an MoE (Qwen3-MoE, routed experts and a
router aux loss) and a sliding/global hybrid (Gemma 3, per-layer masks and per-layer-type RoPE, window 8 < seq_len 64).
Same per-step losses, grad norms and exported weights, at the tolerances of tests/train/test_distributed.py (its
docstring says why). FSDP2 shards each family's own decoder layer (`decoder_layer_classes`), and one FSDP2 run also
recomputes those layers in backward (`activation_checkpointing`), which must not change a number either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from midtrain.data import byte_tokenizer
from midtrain.model.families import decoder_layer_classes, packing_mode
from midtrain.train.distributed import decoder_layers
from tests.model.families import tiny_config
from tests.train.tiny import write_corpus

pytestmark = pytest.mark.slow

LOSS_RTOL, GRAD_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-5

RECIPE = """\
base: {base}
seed: 0
precision: fp32
sources:
  - {{name: prose, path: prose.jsonl, holdout_docs: 4}}
  - {{name: math, path: math.jsonl, holdout_docs: 4}}
stages:
  - name: anneal
    tokens: 2048
    seq_len: 64
    batch: {{tokens: 512, micro: 2}}
    schedule: {{kind: wsd, peak_lr: 2e-3, warmup_tokens: 512, decay_fraction: 0.5}}
    data: {{mixture: {{prose: 0.5, math: 0.5}}}}
    eval: {{max_docs: 4}}
"""


# Tiny configs: hidden 32, 2 layers (one sliding, one global for Gemma 3), 4 experts top-2 for the MoE.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8)
FAMILY = {
    "qwen3_moe": dict(SMALL, moe_intermediate_size=16),
    "gemma3_text": dict(SMALL, layer_types=["sliding_attention", "full_attention"]),
}
CHECKPOINTED = "fsdp2+activation_checkpointing"


def _run(root: Path, name: str, mode: str) -> Path:
    run_dir = root / name
    args = ["run", str(root / "recipe.yaml"), "--set", f"run_dir={run_dir}"]
    if mode == CHECKPOINTED:
        mode, args = "fsdp2", [*args, "--set", "activation_checkpointing=true"]
    if mode == "none":
        cmd = [sys.executable, "-m", "midtrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "midtrain", *args, "--set", f"distributed={mode}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MIDTRAIN_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return run_dir


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize(("model_type", "modes"), [("qwen3_moe", ["ddp", "fsdp2"]),
                                                   ("gemma3_text", ["ddp", "fsdp2", CHECKPOINTED])])
def test_family_trains_the_same_on_two_ranks(model_type, modes, tmp_path):
    write_corpus(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=272, **FAMILY[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert packing_mode(config, 64) == ("layer_masks" if model_type == "gemma3_text" else "document_mask")
    layers = decoder_layers(model)  # what FSDP2 shards one by one and activation checkpointing recomputes
    assert len(layers) == 2 and {type(m) for m in layers} <= set(decoder_layer_classes(model))
    assert type(layers[0]).__name__ != "LlamaDecoderLayer"
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(base=tmp_path / "base"))

    single = _run(tmp_path, "single", "none")
    ref = _train_rows(single)
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for mode in modes:
        parallel = _run(tmp_path, mode, mode)
        got = _train_rows(parallel)
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for a, b in zip(ref, got):
            assert _rel(a["loss"], b["loss"]) <= LOSS_RTOL, (mode, a["step"], a["loss"], b["loss"])
            assert _rel(a["grad_norm"], b["grad_norm"]) <= GRAD_RTOL, (mode, a["step"])
        want = load_file(str(single / "stages/anneal/hf/model.safetensors"))
        have = load_file(str(parallel / "stages/anneal/hf/model.safetensors"))
        assert sorted(want) == sorted(have)
        for name, tensor in want.items():
            assert (have[name] - tensor).abs().max().item() <= WEIGHT_ATOL, (mode, name)
