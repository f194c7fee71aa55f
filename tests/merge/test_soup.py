"""Souping: the merged checkpoint equals the weighted mean computed independently, loads in plain transformers,
keeps sharded layouts and dtypes, and refuses checkpoints that do not belong together."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from midtrain.merge.soup import MergeError, merge_checkpoints
from midtrain.model import build_model, preset_config, save_hf_checkpoint

VOCAB = 64


def _export(tmp_path, name, seed, **overrides):
    model = build_model(preset_config("tiny-llama", vocab_size=VOCAB, **overrides), seed=seed)
    return save_hf_checkpoint(model, None, tmp_path / name), model


def test_weighted_mean_equals_an_independent_average_and_reloads(tmp_path):
    (a, ma), (b, mb), (c, mc) = (_export(tmp_path, n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    out = merge_checkpoints([a, b, c], tmp_path / "soup", weights=[2, 1, 1])
    merged = AutoModelForCausalLM.from_pretrained(out)
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    for name, tensor in merged.state_dict().items():
        expected = 0.5 * sa[name] + 0.25 * sb[name] + 0.25 * sc[name]
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    assert json.loads((out / "midtrain.json").read_text())["weights"] == [0.5, 0.25, 0.25]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "soup"]  # no temp dir left


def test_sharded_bf16_checkpoints_keep_layout_and_dtype(tmp_path):
    dirs = []
    for seed in (1, 2):
        model = build_model(preset_config("tiny-llama", vocab_size=VOCAB), seed=seed).to(torch.bfloat16)
        model.save_pretrained(tmp_path / f"m{seed}", max_shard_size="100KB")
        dirs.append(tmp_path / f"m{seed}")
    shards = sorted(p.name for p in dirs[0].glob("*.safetensors"))
    assert len(shards) > 1
    out = merge_checkpoints(dirs, tmp_path / "soup")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    m1, m2 = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16) for d in dirs)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged.state_dict()[name].dtype == torch.bfloat16
    expected = ((m1.state_dict()[name].float() + m2.state_dict()[name].float()) / 2).to(torch.bfloat16)
    assert torch.equal(merged.state_dict()[name], expected)  # accumulated in fp32, rounded once


def test_mismatches_are_clear_errors(tmp_path):
    a, _ = _export(tmp_path, "a", 1)
    wide, _ = _export(tmp_path, "wide", 2, intermediate_size=96)
    with pytest.raises(MergeError, match="config.intermediate_size"):
        merge_checkpoints([a, wide], tmp_path / "x")
    b, _ = _export(tmp_path, "b", 2)
    (a / "tokenizer.json").write_text("{}")
    with pytest.raises(MergeError, match="has no tokenizer.json"):
        merge_checkpoints([a, b], tmp_path / "x")
    (b / "tokenizer.json").write_text('{"other": 1}')
    with pytest.raises(MergeError, match="tokenizer.json of .* is not the same file"):
        merge_checkpoints([a, b], tmp_path / "x")
    with pytest.raises(MergeError, match="2 values for 3 checkpoints"):
        merge_checkpoints([a, b, b], tmp_path / "x", weights=[1, 1])
    with pytest.raises(MergeError, match="not an HF checkpoint"):
        merge_checkpoints([a, tmp_path], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path):
    a, _ = _export(tmp_path, "a", 1)
    b, _ = _export(tmp_path, "b", 2)
    run = lambda *args: subprocess.run([sys.executable, "-m", "midtrain", "merge", *args], capture_output=True,
                                       text=True, timeout=120)
    ok = run(str(a), str(b), "--out", str(tmp_path / "soup"), "--weights", "1,3")
    assert ok.returncode == 0 and "merged 2 checkpoints" in ok.stdout, ok.stderr
    assert json.loads((tmp_path / "soup/midtrain.json").read_text())["weights"] == [0.25, 0.75]
    bad = run(str(a), str(b), "--out", str(tmp_path / "x"), "--weights", "1,x")
    assert bad.returncode == 2 and "expected comma-separated numbers" in bad.stderr and "Traceback" not in bad.stderr
