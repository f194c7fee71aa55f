"""LongRoPE factor search: order-keeping operators, YaRN-ramp start, resume == uninterrupted, a real gain, the CLI.

The gain is measured on a tiny Llama trained here at L0 = 64 on text whose phrases repeat within a document (so
a model that copies from far back can beat one that cannot), then searched at 4 x L0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from midtrain.cli import app
from midtrain.context import apply_rope, compute, validate_rope
from midtrain.context.rope import RotarySpec, default, yarn
from midtrain.context.search import (
    SearchConfig,
    SearchError,
    crossover,
    initial_factors,
    is_monotone,
    longrope_search,
    mutate,
)
from midtrain.data import byte_tokenizer
from midtrain.data.sources import long_documents
from midtrain.eval.perplexity import perplexity_at_length
from midtrain.model import build_model, preset_config, save_hf_checkpoint

L0, TARGET = 64, 256
CFG = SearchConfig(target_length=TARGET, original=L0, population=6, generations=3, seed=1, max_windows=6)




@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on shared cores OpenMP's spinning makes 2 threads up to
    10x slower than 1 (measured: 100 steps 3 s with 1 thread, 27-58 s with 2 while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ operators
def _random_monotone(rng: np.random.Generator, n: int, s: float) -> list[float]:
    return [float(x) for x in np.sort(np.round(rng.uniform(1, s, n), 2))]


def test_mutation_and_crossover_keep_the_order_bounds_and_grid():
    cfg = SearchConfig(target_length=512, original=128)
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(400):
        a, b = _random_monotone(rng, 16, cfg.factor), _random_monotone(rng, 16, cfg.factor)
        m, c = mutate(a, rng, cfg), crossover(a, b, rng, cfg)
        for child in (m, c):
            assert is_monotone(child) and len(child) == 16
            assert all(1.0 <= x <= cfg.factor for x in child)
            assert all(abs(x * 100 - round(x * 100)) < 1e-6 for x in child)  # on the 0.01 grid
        changed += m != a
        # crossover: each entry comes from a parent, or (fallback) is their mean on the grid
        assert all(x in (p, q) or abs(x - (p + q) / 2) <= 0.005 + 1e-9 for x, p, q in zip(c, a, b))
    assert changed > 300  # mutation does move things


def test_initial_factors_are_the_yarn_ramp():
    spec = RotarySpec(head_dim=32, base=1e4, original_max_position_embeddings=L0)
    lam = initial_factors(spec, CFG)
    assert CFG.ramp_beta_fast == 2.0  # min(32, max(2, L0/32)) at L0 = 64
    assert is_monotone(lam) and lam[0] == 1.0 and lam[-1] == CFG.factor
    # As longrope long factors they give YaRN's frequencies (the oracle is yarn() itself).
    inv, _ = compute("longrope", spec, {"short_factor": [1.0] * 16, "long_factor": lam, "factor": 4}, seq_len=TARGET)
    inv_yarn, _ = yarn(spec, factor=4, beta_fast=2, beta_slow=1)
    torch.testing.assert_close(inv, inv_yarn, rtol=1e-6, atol=0)
    assert torch.equal(default(spec)[0][:1], inv[:1])  # the fastest dimension is kept


# ------------------------------------------------------------------------------------------ a trained model
def _text_documents(seed: int, n: int, length: int) -> list[str]:
    """Each document repeats one random 5-20 letter unit: after its first period, every byte is predictable by
    copying from one period back, which a model can do only if it resolves relative positions."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    units = ["".join(rng.choice(letters, rng.integers(5, 21))) for _ in range(n)]
    return [(unit * (length // len(unit) + 1))[:length] for unit in units]


def _bytes(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in texts]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 165k-parameter Llama (head_dim 32) trained 300 steps at L0 = 64 on fresh byte-tokenized documents."""
    tok = byte_tokenizer()
    config = preset_config("tiny-llama", vocab_size=len(tok), hidden_size=64, intermediate_size=256, head_dim=32)
    model = build_model(config, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        ids = torch.from_numpy(np.stack(_bytes(_text_documents(1000 + step, 16, L0))))
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 30)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    root = tmp_path_factory.mktemp("search")
    save_hf_checkpoint(model, tok, root / "ckpt")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in _text_documents(1, 8, 2 * TARGET)))
    docs = long_documents(heldout, tok, TARGET)
    return {"root": root, "model": model, "docs": docs, "ckpt": root / "ckpt", "heldout": heldout}


def test_search_beats_its_yarn_ramp_start(trained, tmp_path):
    model, docs = trained["model"], trained["docs"]
    result = longrope_search(model, docs, CFG, tmp_path / "out")
    assert is_monotone(result.best) and result.init == initial_factors(
        RotarySpec(head_dim=32, base=1e4, original_max_position_embeddings=L0), CFG)
    # Independent re-measurement (oracle: perplexity_at_length on a fresh apply) of both end points.
    for factors, loss in ((result.init, result.init_loss), (result.best, result.best_loss)):
        apply_rope(model, {"method": "longrope", "original_max_position_embeddings": L0, "factor": 4,
                           "short_factor": [1.0] * 16, "long_factor": factors})
        assert perplexity_at_length(model, docs, TARGET, max_windows=6)["loss"] == pytest.approx(loss, rel=1e-6)
    assert result.best_loss < result.init_loss - 0.02, (result.init_loss, result.best_loss)
    best_per_generation = [row["best_loss"] for row in result.history]
    assert best_per_generation == sorted(best_per_generation, reverse=True)  # elitism: never gets worse
    assert len(result.history) == CFG.generations + 1
    # The snippet is a valid rope setting for this checkpoint at the target length.
    snippet = yaml.safe_load((tmp_path / "out/rope.yaml").read_text())["rope"]
    assert snippet["long_factor"] == result.best  # exact floats: the snippet reproduces the loss
    assert [i for i in validate_rope(snippet, TARGET, model.config) if i[0] == "error"] == []
    history = json.loads((tmp_path / "out/history.json").read_text())
    assert history["best"]["loss"] == result.best_loss and history["init"]["loss"] == result.init_loss


def test_resumed_search_equals_an_uninterrupted_one(trained, tmp_path):
    model, docs = trained["model"], trained["docs"]
    whole = longrope_search(model, docs, CFG, tmp_path / "whole")
    first = SearchConfig(**{**CFG.__dict__, "generations": 1})
    longrope_search(model, docs, first, tmp_path / "split")  # "interrupted" after generation 1
    assert json.loads((tmp_path / "split/state.json").read_text())["generation"] == 1
    resumed = longrope_search(model, docs, CFG, tmp_path / "split")
    assert resumed.best == whole.best and resumed.best_loss == whole.best_loss
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert (tmp_path / "split/rope.yaml").read_text() == (tmp_path / "whole/rope.yaml").read_text()
    with pytest.raises(SearchError, match="different search .*seed: 1 -> 2"):
        longrope_search(model, docs, SearchConfig(**{**CFG.__dict__, "seed": 2}), tmp_path / "split")


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_search_end_to_end_and_resume(trained, tmp_path):
    args = [sys.executable, "-m", "midtrain", "rope", "search", str(trained["ckpt"]), "--target-length", str(TARGET),
            "--data", str(trained["heldout"]), "--original", str(L0), "--population", "4", "--generations", "1",
            "--windows", "2", "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "generation 1/1: best loss" in out.stdout  # not a terminal: plain lines
    assert yaml.safe_load((tmp_path / "out/rope.yaml").read_text())["rope"]["method"] == "longrope"
    again = _cli(*args[5:-5], "2", *args[-4:])  # in-process this time: --generations 2 extends the search
    assert again.exit_code == 0, again.output
    assert "generation 1/" not in again.output and "generation 2/2" in again.output  # continued, not redone


def _cli(*args: str):
    return CliRunner().invoke(app, ["rope", "search", *args])


def test_cli_errors_name_the_problem(trained, tmp_path):
    ckpt, data = str(trained["ckpt"]), str(trained["heldout"])
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    cases = [
        ((str(tmp_path / "nope"), "--target-length", "256", "--data", data, "--original", "64"), 2, "CHECKPOINT"),
        ((ckpt, "--target-length", "256", "--data", str(tmp_path / "x.jsonl"), "--original", "64"), 2, "--data"),
        ((ckpt, "--target-length", "64", "--data", data, "--original", "64"), 2, "--target-length"),
        ((ckpt, "--target-length", "256", "--data", data), 2, "--original is required"),
        ((ckpt, "--target-length", "256", "--data", data, "--original", "64", "--population", "2"), 2,
         "--population"),
        ((ckpt, "--target-length", "256", "--data", str(short), "--original", "64"), 1, "no document has 256 tokens"),
    ]
    for args, code, fragment in cases:
        result = _cli(*args, "--out", str(tmp_path / "o"))
        assert result.exit_code == code, (args, result.output)
        assert fragment in result.output and "Traceback" not in result.output, result.output
    assert str(short) in _cli(ckpt, "--target-length", "256", "--data", str(short), "--original", "64").output
