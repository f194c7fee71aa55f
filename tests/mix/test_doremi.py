"""DoReMi: the Group-DRO weight update, excess losses and objective against hand-computed values; the whole method
end to end on a tiny model (a real reference run, a real Group-DRO proxy, verification, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from midtrain.mix.doremi import DoremiConfig, domain_excess, dro_objective, group_dro_update
from midtrain.mix.proxy import MixError
from tests.mix.toy import write_recipe
from tests.train.tiny import midtrain


def test_group_dro_step_matches_the_hand_computed_one():
    # weights [0.5, 0.3, 0.2], excess [ln 2, 0, ln 4], eta 1: unnormalised [1.0, 0.3, 0.8], sum 2.1;
    # smoothing 0.1: 0.9 * [10, 3, 8] / 21 + 0.1 / 3
    got = group_dro_update(np.array([0.5, 0.3, 0.2]), np.array([math.log(2), 0.0, math.log(4)]), 1.0, 0.1)
    want = [0.9 * 10 / 21 + 0.1 / 3, 0.9 * 3 / 21 + 0.1 / 3, 0.9 * 8 / 21 + 0.1 / 3]
    assert got == pytest.approx(want, abs=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    # eta scales the exponent: eta 0.5 on excess [ln 4, 0] is exp(ln 2) = 2x for the first domain
    assert group_dro_update(np.array([0.5, 0.5]), np.array([math.log(4), 0.0]), 0.5, 0.0) == pytest.approx([2 / 3,
                                                                                                             1 / 3])


def test_a_source_absent_from_the_batch_keeps_its_weight():
    # present mass 0.8 is shared as the full step would share it: [0.5 * 2, 0.3 * 1] / 1.3 * 0.8; the third keeps 0.2
    got = group_dro_update(np.array([0.5, 0.3, 0.2]), np.array([math.log(2), 0.0, 0.0]), 1.0, 0.0,
                           present=np.array([True, True, False]))
    assert got == pytest.approx([0.8 * 1.0 / 1.3, 0.8 * 0.3 / 1.3, 0.2], abs=1e-12)
    nothing = group_dro_update(np.array([0.7, 0.3]), np.array([0.0, 0.0]), 1.0, 0.1, present=np.array([False] * 2))
    assert nothing == pytest.approx([0.9 * 0.7 + 0.05, 0.9 * 0.3 + 0.05])


def test_group_dro_step_edge_cases():
    uniform = np.full(4, 0.25)
    assert group_dro_update(uniform, np.zeros(4), 1.0, 1e-3) == pytest.approx(uniform)  # no excess: no change
    # a huge excess does not overflow (log space), and smoothing keeps every domain above c / k
    w = group_dro_update(uniform, np.array([1e4, 0.0, 0.0, 0.0]), 1.0, 1e-3)
    assert np.isfinite(w).all() and w[1:] == pytest.approx([1e-3 / 4] * 3) and w.sum() == pytest.approx(1.0)
    assert group_dro_update(np.array([0.9, 0.1]), np.array([5.0, 0.0]), 1.0, 1.0) == pytest.approx([0.5, 0.5])


def test_domain_excess_clips_per_token_and_ignores_unpredicted_positions():
    losses = torch.tensor([2.0, 1.0, 3.0, 0.5, 9.0, 4.0])
    reference = torch.tensor([1.0, 2.0, 1.0, 0.0, 0.0, 1.0])
    sources = torch.tensor([0, 0, 1, 1, -1, 0])  # position 4 predicts nothing
    sums, counts = domain_excess(losses, reference, sources, 3)
    # source 0: max(1, 0) + max(-1, 0) + max(3, 0) = 4 over 3 tokens; source 1: 2 + 0.5 over 2; source 2: none
    assert sums.tolist() == [4.0, 2.5, 0.0] and counts.tolist() == [3.0, 2.0, 0.0]


def test_dro_objective_is_the_weighted_mean_of_per_domain_means_across_micro_batches():
    losses = [torch.tensor([1.0, 3.0, 5.0], requires_grad=True), torch.tensor([2.0, 7.0], requires_grad=True)]
    sources = [torch.tensor([0, 1, -1]), torch.tensor([0, 0])]
    counts = torch.tensor([3.0, 1.0], dtype=torch.float64)  # the step's tokens per source
    weights = torch.tensor([0.25, 0.75])
    total = sum(dro_objective(x, s, weights, counts) for x, s in zip(losses, sources))
    # source 0: (1 + 2 + 7) / 3, source 1: 3 / 1
    assert float(total.detach()) == pytest.approx(0.25 * 10 / 3 + 0.75 * 3)
    total.backward()
    assert losses[0].grad.tolist() == pytest.approx([0.25 / 3, 0.75, 0.0])
    assert losses[1].grad.tolist() == pytest.approx([0.25 / 3, 0.25 / 3])


@pytest.mark.parametrize("kwargs, message", [
    ({"reference": "pile"}, "--reference 'pile': choose uniform or recipe"),
    ({"step_size": 0.0}, "--step-size 0.0: must be > 0"),
    ({"smoothing": 1.5}, "--smoothing 1.5: a fraction in [0, 1]"),
    ({"workers": 0}, "--workers 0: must be >= 1"),
])
def test_config_errors_name_the_option(kwargs, message):
    with pytest.raises(MixError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        DoremiConfig(stage="warm", **kwargs)


@pytest.mark.slow
def test_tiny_doremi_trains_reference_and_proxy_then_verifies_and_resumes(tmp_path):
    recipe = write_recipe(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "doremi"
    args = ("mix", "doremi", str(recipe), "--stage", "warm", "--tokens", "2048", "--threads", "1", "--out", str(out),
            "--smoothing", "0.01", "--verify-seeds", "1", "--target", "loss.math")
    first = midtrain(*args, cache=cache, timeout=180)
    assert "0/2 already done" in first.stdout and "doremi (averaged)" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    names = summary["sources"]
    assert names == ["prose", "math", "code"] and summary["reference"]["mixture"] == {n: 1 / 3 for n in names}
    rows = [json.loads(line) for line in (out / "proxy" / "weights.jsonl").read_text().splitlines()]
    assert len(rows) == summary["proxy"]["steps"] == 2048 // 512
    # every recorded step is the Group-DRO update of the previous weights by that step's excess losses
    weights = np.full(3, 1 / 3)
    for row in rows:  # a source absent from a step's batch has no excess recorded
        weights = group_dro_update(weights, np.array([row["excess"].get(n, 0.0) for n in names]), 1.0, 0.01,
                                   present=np.array([n in row["excess"] for n in names]))
        assert [row["weights"][n] for n in names] == pytest.approx(weights.tolist(), abs=1e-12)
    assert any(e > 0 for row in rows for e in row["excess"].values())  # the reference is ahead of the proxy
    average = np.mean([[row["weights"][n] for n in names] for row in rows], axis=0)
    assert [summary["mixtures"]["doremi"][n] for n in names] == pytest.approx(average.tolist(), abs=1e-12)
    snippet = yaml.safe_load((out / "best_mixture.yaml").read_text())
    assert snippet["data"]["mixture"] == {n: round(w, 4) for n, w in summary["mixtures"]["doremi"].items()}
    # the reference trained the uniform mixture through `midtrain run`'s machinery; its weights are dropped after
    reference = json.loads((out / "reference" / "result.json").read_text())
    assert reference["tokens"] == 2048 and reference["mixture"] == pytest.approx({n: 1 / 3 for n in names}, abs=1e-6)
    assert not (out / "reference" / "run" / "checkpoints").exists()
    verified = summary["verify"]
    assert set(verified) == {"doremi", "recipe", "uniform"} and all(len(v["values"]) == 1 for v in verified.values())
    trained = json.loads((out / "verify" / "doremi-seed1" / "result.json").read_text())
    assert trained["mixture"] == pytest.approx(summary["mixtures"]["doremi"], abs=1e-6)
    assert trained["tokens"] == 4096  # the weights' target run: the stage's own budget, not the proxy's
    assert verified["doremi"]["values"] == [trained["metrics"]["loss.math"]]

    again = midtrain(*args, cache=cache, timeout=60)  # resumed: nothing trains again
    assert "2/2 already done" in again.stdout and "3/3 already done" in again.stdout
    assert json.loads((out / "summary.json").read_text())["mixtures"] == summary["mixtures"]
    changed = midtrain(*args[:-4], "--step-size", "2", cache=cache, timeout=60, check=False)
    assert changed.returncode == 1 and "step_size: 1.0 -> 2.0" in changed.stdout + changed.stderr
