"""Gradient noise scale: the estimators against closed-form oracles (linear regression; softmax regression trained
through the real Trainer), and the recipe checks."""

from __future__ import annotations

import math

import pytest
import torch

from midtrain.config.checks import recipe_problems
from midtrain.config.recipe import Recipe
from midtrain.train.gns import GradientNoiseScale, gns_estimates
from midtrain.train.trainer import Callback

from .toy_trainer import Bigram, Record, V, make_trainer, transition


def test_estimators_are_unbiased_on_linear_regression():
    """y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²), loss ½(x·w − y)², at w = w* + r. Per-example gradient
    g = (x·r − ε)x, so G = r and (Isserlis) Σ = |r|²I + rrᵀ + σ²I: |G|² = |r|², tr(Σ) = (d + 1)|r|² + dσ²."""
    d, sigma, b_small, b_big, trials = 6, 0.5, 8, 64, 20000
    g = torch.Generator().manual_seed(0)
    r = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    x = torch.randn(trials, b_big, d, generator=g, dtype=torch.float64)
    eps = sigma * torch.randn(trials, b_big, generator=g, dtype=torch.float64)
    grads = ((x @ r) - eps).unsqueeze(-1) * x  # [trials, b_big, d]
    small = grads[:, :b_small].mean(1).pow(2).sum(-1)
    big = grads.mean(1).pow(2).sum(-1)
    est = torch.tensor([gns_estimates(float(s), float(b), b_small, b_big) for s, b in zip(small, big)])
    g2_true, tr_true = float(r @ r), (d + 1) * float(r @ r) + d * sigma**2
    g2_mean, tr_mean = est.mean(0).tolist()
    g2_se, tr_se = (est.std(0) / math.sqrt(trials)).tolist()
    assert abs(g2_mean - g2_true) < 4 * g2_se, (g2_mean, g2_true, g2_se)
    assert abs(tr_mean - tr_true) < 4 * tr_se, (tr_mean, tr_true, tr_se)
    assert abs(tr_mean / g2_mean - tr_true / g2_true) / (tr_true / g2_true) < 0.05  # B_simple within 5%
    # The naive "small-batch norm" is biased upwards by tr(Σ)/B: the correction is what the test pins.
    assert float(small.mean()) > g2_true + 0.5 * tr_true / b_small


def softmax_regression_oracle(w: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Per predicted token (x uniform over V, y ~ P[x]), loss CE(W[x], y): g = e_x ⊗ (softmax(W[x]) − e_y).
    |G|² = Σ_x |s_x − P_x|² / V²;  E|g|² = Σ_x (|s_x|² − 2 s_x·P_x + 1) / V;  tr(Σ) = E|g|² − |G|²."""
    s = torch.softmax(w.double(), dim=1)
    g2 = float(((s - p) ** 2).sum()) / V**2
    e_g2 = float(((s**2).sum(1) - 2 * (s * p).sum(1) + 1).sum()) / V
    return g2, e_g2 - g2


class _Collect(Callback):
    def __init__(self, gns: GradientNoiseScale):
        self.gns, self.values = gns, []

    def on_step_end(self, trainer, row):
        if self.gns.last is not None and "gns" in row:
            self.values.append(self.gns.last)


def test_callback_through_the_trainer_matches_the_softmax_regression_oracle():
    """LR 0 keeps W fixed, so every step samples the same gradient distribution; micro-batches of 2 rows
    (B_small = 30 tokens) inside steps of 4 (B_big = 120). Per-step estimates average to the oracle within 4 standard
    errors; the EMA-smoothed ratio logged as `gns` lands within 15% of B_simple."""
    gns = GradientNoiseScale(every_steps=1, ema=0.99)
    collect = _Collect(gns)
    trainer = make_trainer(600, 0.0, [gns, collect])
    trainer.fit()
    g2_true, tr_true = softmax_regression_oracle(trainer.model.w.detach(), transition())
    est = torch.tensor(collect.values, dtype=torch.float64)
    assert len(est) == 600
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert abs(mean[0] - g2_true) < 4 * se[0], (mean[0], g2_true, se[0])
    assert abs(mean[1] - tr_true) < 4 * se[1], (mean[1], tr_true, se[1])
    assert gns.b_simple == pytest.approx(tr_true / g2_true, rel=0.15)


def test_rows_carry_the_smoothed_values_only_on_measured_steps_and_training_is_unchanged():
    record_plain, record_gns = Record(), Record()
    make_trainer(9, 0.5, [record_plain]).fit()
    gns = GradientNoiseScale(every_steps=3, ema=0.5)
    make_trainer(9, 0.5, [gns, record_gns]).fit()
    assert all(torch.equal(a, b) for a, b in zip(record_plain.weights, record_gns.weights))  # a read-only monitor
    measured = [r["stage_step"] for r in record_gns.rows if "gns" in r]
    assert measured == [3, 6, 9]
    last = record_gns.rows[-1]
    assert last["gns"] == pytest.approx(last["gns_tr_sigma"] / last["gns_g2"])
    assert gns.measurements == 3


def test_state_round_trip_continues_the_same_emas():
    a = GradientNoiseScale(every_steps=1, ema=0.9)
    a.load_state_dict({"ema_g2": 2.0, "ema_tr_sigma": 10.0, "measurements": 4})
    b = GradientNoiseScale(every_steps=1, ema=0.9)
    b.load_state_dict(a.state_dict())
    assert b.b_simple == 5.0 and b.measurements == 4
    assert math.isnan(GradientNoiseScale(1).b_simple)


def test_one_micro_batch_per_step_is_not_measured(capsys):
    gns = GradientNoiseScale(every_steps=1)
    record = Record()
    make_trainer(3, 0.0, [gns, record], micro=1, model=Bigram()).fit()
    assert gns.measurements == 0 and not any("gns" in r for r in record.rows)
    assert "needs >= 2 micro-batches" in capsys.readouterr().out


def _recipe(**stage_extra) -> dict:
    stage = {"name": "s", "tokens": 4096, "seq_len": 64, "batch": {"tokens": 512, "micro": 4},
             "schedule": {"kind": "constant", "peak_lr": 1e-3}, "data": {"mixture": {"a": 1}}, **stage_extra}
    return {"base": "preset:tiny-llama", "sources": [{"name": "a", "path": "a.jsonl"}], "stages": [stage]}


def _problems(data: dict) -> list[str]:
    return [".".join(map(str, path)) + ": " + msg for path, msg in recipe_problems(Recipe.model_validate(data))]


def test_recipe_checks_for_the_monitor():
    assert _problems({**_recipe(), "monitor": {"gns_every_steps": 10}}) == []
    data = _recipe(monitor={"gns_every_steps": 10}, batch={"tokens": 512})
    assert any("stages.0.monitor.gns_every_steps: needs at least 2 micro-batches" in p for p in _problems(data))
    data = {**_recipe(), "monitor": {"gns_every_steps": 5}, "log_every_steps": 2}
    assert any("monitor.gns_every_steps: must be a multiple of log_every_steps (2)" in p for p in _problems(data))
    with pytest.raises(ValueError, match="gns_every_steps"):
        Recipe.model_validate({**_recipe(), "monitor": {"gns_every_steps": 0}})
    assert Recipe.model_validate(_recipe(monitor={"gns_every_steps": 4})).stage_monitor(0).gns_every_steps == 4
