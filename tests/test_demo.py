"""The demo: its synthetic retrieval documents never use the evaluation's passkey prompt (no train-on-test), its
recipes fit together, and its shipped base is a plain transformers checkpoint with its own tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from midtrain.demo import (
    BASE_RECIPE_FILE,
    DEMO_BASE,
    RECIPE_FILE,
    check_base,
    eval_template_sentences,
    math_documents,
    name_vocabulary,
    prose_documents,
    retrieval_documents,
)


def _words(text: str) -> int:
    return len(text.split())


def test_retrieval_documents_never_contain_the_eval_passkey_template():
    names = name_vocabulary(prose_documents())
    assert len(set(names)) > 4_000 and not any("pass" in n.split() or "key" in n.split() for n in names)
    docs = retrieval_documents(3000, 20, 200, _words, seed=0, names=names)
    banned = [s.lower() for s in eval_template_sentences()]
    assert "remember it." in banned and "the grass is green." in banned and "pass key" in banned
    for doc in docs:
        low = doc.lower()
        hits = [b for b in banned if b in low]
        assert not hits, (hits, doc[:300])
        assert "passkey" not in low


def test_retrieval_documents_hold_their_answer_and_length():
    docs = retrieval_documents(200, 30, 120, _words, seed=1, names=["blue lantern", "quiet ledger"])
    for doc in docs:
        assert _words(doc) <= 120 + 4
        numbers = re.findall(r"\d+", doc)
        key = numbers[-1]
        assert set(numbers) == {key}  # the key is the only number: the filler holds no digits
        assert doc.count(key) >= 2  # stated in the fact, repeated as the answer at the end
        assert doc.rstrip(".").endswith(key)
        assert "blue lantern" in doc or "quiet ledger" in doc
    with pytest.raises(ValueError, match="non-empty list of names"):
        retrieval_documents(1, 30, 120, _words, seed=1, names=[])


def test_math_documents_are_seeded():
    assert math_documents(5, seed=3) == math_documents(5, seed=3)


def test_anneal_starts_where_the_shipped_base_ended():
    base = yaml.safe_load(BASE_RECIPE_FILE.read_text())
    demo = yaml.safe_load(RECIPE_FILE.read_text())
    assert base["base"] == "preset:tiny-llama-4h"
    anneal = demo["stages"][0]
    assert anneal["start_lr"] == "from_base"
    assert anneal["schedule"]["decay_fraction"] == 1.0 and anneal["schedule"]["min_lr"] == 0
    shipped = json.loads((DEMO_BASE / "midtrain.json").read_text())
    assert shipped["stage"] == base["stages"][-1]["name"]
    assert shipped["last_lr"] == pytest.approx(float(base["stages"][-1]["schedule"]["min_lr"]))


def test_shipped_base_loads_in_plain_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from midtrain.model import load_model

    check_base(DEMO_BASE)
    model = AutoModelForCausalLM.from_pretrained(DEMO_BASE)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_BASE)
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 32
    assert len(tokenizer) == model.config.vocab_size
    ids = tokenizer("The key is 12345", return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(t).strip() for t in ids[0, -5:]] == list("12345")  # digits one token each
    with torch.no_grad():
        logits = model(ids).logits
        ours = load_model(DEMO_BASE)(ids).logits  # what `midtrain run` starts the anneal from
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(ours, logits, rtol=0, atol=0)


def test_missing_base_says_how_to_rebuild(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model.safetensors.*midtrain demo --build-base"):
        check_base(tmp_path)


@pytest.mark.slow
def test_build_base_then_demo_from_it(tmp_path: Path):
    """`midtrain demo --build-base` (budgets cut to a few steps) installs a complete base, and the demo's anneal
    starts from the LR that base ended with."""
    import subprocess
    import sys

    base = tmp_path / "base"
    tiny = ["--set", "stages.pretrain.tokens=16k", "--set", "stages.pretrain.schedule.warmup_tokens=4096",
            "--set", "stages.settle.tokens=16k", "--set", "stages.pretrain.eval.samples=4",
            "--set", "stages.settle.eval.samples=4"]
    cmd = [sys.executable, "-m", "midtrain", "demo", "--build-base", "--base-dir", str(base), "--out",
           str(tmp_path / "build"), *tiny]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check_base(base)
    assert json.loads((base / "midtrain.json").read_text())["last_lr"] == pytest.approx(5e-4)
    assert "passkey@128" in json.loads((base / "provenance.json").read_text())["metrics"]

    cmd = [sys.executable, "-m", "midtrain", "demo", "--quick", "--base-dir", str(base), "--out",
           str(tmp_path / "demo"), "--set", "stages.anneal.tokens=8k", "--set", "stages.extend.tokens=8k",
           "--set", "stages.extend.schedule.warmup_tokens=4096"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    plan = json.loads((tmp_path / "demo" / "run" / "plan.json").read_text())
    anneal = next(s for s in plan["stages"] if s["name"] == "anneal")
    assert anneal["lr_boundaries"]["start_lr"] == pytest.approx(5e-4) and anneal["last_lr"] == 0.0
    assert "passkey@512" in done.stdout  # the before/after table


def test_demo_without_a_base_says_how_to_build_one(tmp_path: Path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "midtrain", "demo", "--quick", "--base-dir", str(tmp_path / "none"), "--out",
           str(tmp_path / "demo")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "midtrain demo --build-base" in done.stderr and "Traceback" not in done.stderr
