"""`seeds: [...]`: branch loaders (same documents, own order), cursor hand-over, and a 3-stage run end to end —
soup = mean of the branch exports, the next stage starts from the soup, a killed branch resumes exactly."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from midtrain.data import PackedLoader, byte_tokenizer, tokenize_source
from midtrain.data.cursors import furthest_cursors
from midtrain.data.loader import BranchLoader
from midtrain.run.branches import branch_starts

from ..test_contracts import documented_metric_key
from ..train.tiny import RECIPE, midtrain, train_rows, write_corpus


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch-src")
    rng = random.Random(0)
    out = []
    for name in ("a", "b"):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name}{i} " + "x" * rng.randint(5, 40)}) + "\n"
                                for i in range(40)))
        out.append(tokenize_source(name, path, "text", byte_tokenizer(), holdout_docs=0, cache_dir=root / "cache"))
    return out


def _loader(sources, branch_seed=None, starts=None):
    kw = dict(seq_len=32, global_batch_seqs=4, seed=0)
    if branch_seed is None:
        return PackedLoader(sources, [0.5, 0.5], **kw)
    return BranchLoader(sources, [0.5, 0.5], branch_seed=branch_seed, starts=starts, **kw)


def _stream(loader, steps):
    return np.concatenate([mb["input_ids"].numpy().ravel() for _ in range(steps) for mb in loader.next_step()])


def test_branch_loaders_reorder_only_the_documents_not_yet_consumed(sources):
    previous = _loader(sources)
    _stream(previous, 5)  # an earlier stage read some documents
    cursors = previous.source_cursors()
    starts = branch_starts(cursors)
    branches = {}
    for seed in (1, 2):
        loader = _loader(sources, seed, starts)
        loader.load_source_cursors(cursors)
        branches[seed] = loader
    for s, src in enumerate(sources):
        epoch, pos = starts[src.name]
        assert pos > 0
        base = previous.permutation(s, epoch)
        one, two = branches[1].permutation(s, epoch), branches[2].permutation(s, epoch)
        assert np.array_equal(one[:pos], base[:pos]) and np.array_equal(two[:pos], base[:pos])  # consumed: kept
        assert np.array_equal(np.sort(one[pos:]), np.sort(base[pos:]))  # the same unconsumed documents ...
        assert np.array_equal(np.sort(two[pos:]), np.sort(base[pos:]))
        assert not np.array_equal(one[pos:], two[pos:]) and not np.array_equal(one[pos:], base[pos:])  # ... reordered
        assert not np.array_equal(branches[1].permutation(s, epoch + 1), branches[2].permutation(s, epoch + 1))
    streams = {seed: _stream(loader, 3) for seed, loader in branches.items()}
    assert not np.array_equal(streams[1], streams[2])
    # A branch loader's state resumes it exactly (its order is a pure function of seed, epoch and the starts).
    again = _loader(sources, 1, starts)
    again.load_source_cursors(cursors)
    _stream(again, 3)
    resumed = _loader(sources, 1, starts)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert np.array_equal(_stream(resumed, 2), _stream(again, 2))


def test_cursor_hand_over_takes_the_furthest_branch_and_skips_a_half_read_document():
    c = {"seed": 0, "fingerprint": "f", "n_docs": 10}
    one = {"a": {**c, "epoch": 0, "cursor": 4, "offset": 3}, "b": {**c, "epoch": 1, "cursor": 0, "offset": 0}}
    two = {"a": {**c, "epoch": 0, "cursor": 3, "offset": 0}, "b": {**c, "epoch": 0, "cursor": 9, "offset": 5}}
    out = furthest_cursors([one, two])
    assert (out["a"]["epoch"], out["a"]["cursor"], out["a"]["offset"]) == (0, 5, 0)
    assert (out["b"]["epoch"], out["b"]["cursor"], out["b"]["offset"]) == (1, 0, 0)
    assert furthest_cursors([two])["b"]["epoch"] == 1  # cursor 9 + a half-read document rolls the epoch
    assert branch_starts({"a": {**c, "epoch": 2, "cursor": 9, "offset": 1}}) == {"a": (3, 0)}
    assert branch_starts({"a": {**c, "epoch": 0, "cursor": 4, "offset": 0}}) == {"a": (0, 4)}


def test_recipe_checks_for_seeds():
    from ..train.test_gns import _problems, _recipe

    assert any("seeds: needs at least 2 distinct seeds" in p for p in _problems(_recipe(seeds=[1, 1], init="weights")))
    assert any("seeds: branches must share their start weights" in p for p in _problems(_recipe(seeds=[1, 2])))


# --------------------------------------------------------------------------- end to end (slow)


def _write_recipe(root):
    write_corpus(root)
    data = yaml.safe_load(RECIPE.format(warm_tokens=4096, anneal_tokens=2048, every=1024))
    data["monitor"] = {"gns_every_steps": 2}
    anneal = data["stages"][1]
    anneal.update(seeds=[1, 2], average={"kind": "tail"})  # wsd decay over the whole stage: all 4 steps averaged
    data["stages"].append({"name": "cool", "init": "weights", "tokens": 1024, "seq_len": 64,
                           "batch": {"tokens": 512, "micro": 4}, "schedule": {"kind": "constant", "peak_lr": 1e-3},
                           "data": {"mixture": {"prose": 1}}, "eval": {"max_docs": 4}})
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def souped(tmp_path_factory):
    root = tmp_path_factory.mktemp("souped")
    recipe = _write_recipe(root)
    result = midtrain("run", str(recipe), "--set", f"run_dir={root / 'out'}", cache=root / "cache")
    return root, recipe, result


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_branches_write_their_sub_runs_and_read_different_data(souped):
    root, _, _ = souped
    run = root / "out"
    for seed in (1, 2):
        b = run / "stages/anneal" / f"seed-{seed}"
        for rel in ("hf/model.safetensors", "hf-raw/model.safetensors", "eval.json", "eval.raw.json",
                    "metrics.jsonl", "checkpoints/step-12/manifest.json"):
            assert (b / rel).exists(), (seed, rel)
    for rel in ("stages/anneal/hf/midtrain_probe.safetensors", "checkpoints/anneal/step-12/manifest.json",
                "eval/anneal-before.json", "eval/anneal.json", "stages/cool/hf/config.json"):
        assert (run / rel).exists(), rel
    losses = {seed: [r["loss"] for r in train_rows(run / "stages/anneal" / f"seed-{seed}")] for seed in (1, 2)}
    assert len(losses[1]) == len(losses[2]) == 4 and losses[1] != losses[2]  # other documents, other losses
    assert [r["step"] for r in train_rows(run)] == [*range(1, 9), 13, 14]  # main rows: warm, cool; branches apart
    events = [r["event"] for r in _rows(run / "metrics.jsonl") if r["stage"] == "anneal"]
    assert events == ["stage_start", "soup", "stage_end"]


@pytest.mark.slow
def test_soup_is_the_mean_of_the_branch_exports_and_the_next_stage_starts_from_it(souped):
    root, _, _ = souped
    run = root / "out"
    one, two = (_weights(run / "stages/anneal" / f"seed-{k}/hf") for k in (1, 2))
    soup = _weights(run / "stages/anneal/hf")
    assert soup.keys() == one.keys()
    for name in soup:
        assert torch.allclose(soup[name], (one[name] + two[name]) / 2, atol=1e-6, rtol=0), name
    assert any(not torch.equal(one[n], two[n]) for n in one)
    info = json.loads((run / "stages/anneal/hf/midtrain.json").read_text())
    assert info["soup"]["seeds"] == [1, 2] and info["global_step"] == 12 and info["fingerprint"]
    # The soup checkpoint: mean of the branches' fp32 weights (what a later stage's optimizer state sits beside).
    ckpt_soup = _weights(run / "checkpoints/anneal/step-12")
    ckpt_one, ckpt_two = (_weights(run / "stages/anneal" / f"seed-{k}/checkpoints/step-12") for k in (1, 2))
    assert all(torch.allclose(ckpt_soup[n], (ckpt_one[n] + ckpt_two[n]) / 2, atol=1e-6, rtol=0) for n in ckpt_soup)
    # The next stage's start is the soup: its before-eval names it and reproduces the soup's after-eval.
    after = json.loads((run / "eval/anneal.json").read_text())
    cool_before = json.loads((run / "eval/cool-before.json").read_text())
    assert cool_before["checkpoint"] == str(run / "stages/anneal/hf")
    assert cool_before["metrics"] == pytest.approx(after["metrics"], rel=1e-6)
    # Each branch's end eval is recorded next to the soup's (the report's soup-vs-branches table).
    branch_loss = [json.loads((run / "stages/anneal" / f"seed-{k}/eval.json").read_text())["metrics"]["loss"]
                   for k in (1, 2)]
    assert all(isinstance(x, float) for x in branch_loss)
    report = (run / "report.md").read_text()
    assert "seed-1" in report and "soup" in report
    assert (run / "plots/gns.png").is_file()


@pytest.mark.slow
def test_branches_export_the_average_and_keep_the_raw_weights(souped):
    root, _, _ = souped
    b = root / "out/stages/anneal/seed-1"
    raw, averaged, final = _weights(b / "hf-raw"), _weights(b / "hf"), _weights(b / "checkpoints/step-12")
    assert all(torch.equal(raw[n], final[n]) for n in raw if n in final)  # hf-raw = the last step's weights
    assert any(not torch.allclose(raw[n], averaged[n]) for n in raw)  # hf = their tail average
    state = json.loads((b / "checkpoints/step-12/trainer.json").read_text())
    assert state["average"]["count"] == 4 and (b / "checkpoints/step-12/average.safetensors").is_file()
    shadow = load_file(str(b / "checkpoints/step-12/average.safetensors"))
    assert all(torch.equal(shadow[n], averaged[n]) for n in shadow)


@pytest.mark.slow
def test_gns_rows_are_logged_and_documented(souped):
    root, _, _ = souped
    run = root / "out"
    rows = train_rows(run) + train_rows(run / "stages/anneal/seed-1")
    measured = [r for r in rows if "gns" in r]
    assert [r["stage_step"] for r in measured] == [2, 4, 6, 8, 2, 2, 4]  # warm, cool, then branch 1
    assert all(math.isfinite(r["gns"]) and r["gns"] == pytest.approx(r["gns_tr_sigma"] / r["gns_g2"]) for r in measured)
    assert all(documented_metric_key(k) for r in rows for k in r)


@pytest.mark.slow
def test_a_killed_branch_resumes_and_the_finished_one_is_not_redone(souped, tmp_path):
    root, recipe, _ = souped
    run = tmp_path / "run"
    shutil.copytree(root / "out", run)
    # What a SIGKILL during branch 2's 4th step leaves: its checkpoint at step 10, nothing of the soup or later.
    two = run / "stages/anneal/seed-2"
    for path in (two / "checkpoints/step-12", two / "hf", two / "hf-raw", two / "eval.json", two / "eval.raw.json",
                 run / "stages/anneal/hf", run / "checkpoints/anneal", run / "eval/anneal.json",
                 run / "stages/cool", run / "checkpoints/cool", run / "eval/cool-before.json", run / "eval/cool.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    keep = [r for r in _rows(run / "metrics.jsonl") if r["stage"] == "warm" or r["event"] == "stage_start"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep if r["stage"] != "cool"))
    one_mtime = (run / "stages/anneal/seed-1/hf/model.safetensors").stat().st_mtime_ns

    result = midtrain("run", str(recipe), "--set", f"run_dir={run}", cache=root / "cache")
    assert "branch seed-1 already finished; skipping" in result.stdout
    assert "resumed stage 'anneal' from step 10" in result.stdout
    assert (run / "stages/anneal/seed-1/hf/model.safetensors").stat().st_mtime_ns == one_mtime
    original = root / "out"
    for rel in ("stages/anneal/seed-2/hf", "stages/anneal/hf", "stages/cool/hf"):
        a, b = _weights(original / rel), _weights(run / rel)
        assert all(torch.equal(a[n], b[n]) for n in a), rel  # bit for bit, down to the next stage
    ref, got = train_rows(original / "stages/anneal/seed-2"), train_rows(two)
    assert [(r["step"], r["loss"], r.get("gns")) for r in got] == [(r["step"], r["loss"], r.get("gns")) for r in ref]
