"""Dirichlet sampling, rank correlation and the regression against known functions of the weights."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from midtrain.mix.regress import best_mixture, cross_validate, fit, rankdata, sample_mixtures, spearman


def test_dirichlet_samples_are_centred_on_the_stage_weights_and_seeded():
    center = np.array([0.5, 0.3, 0.2])
    w = sample_mixtures(center, concentration=5.0, n=4000, seed=7)
    assert w.shape == (4000, 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    # mean = centre; variance of a Dirichlet marginal = w(1 - w) / (c + 1)
    np.testing.assert_allclose(w.mean(0), center, atol=0.01)
    np.testing.assert_allclose(w.var(0), center * (1 - center) / 6.0, rtol=0.1)
    np.testing.assert_array_equal(sample_mixtures(center, 5.0, 4000, seed=7), w)
    assert not np.allclose(sample_mixtures(center, 5.0, 10, seed=8), w[:10])
    # a larger draw keeps the first n (an extended search keeps its proxies)
    np.testing.assert_array_equal(sample_mixtures(center, 5.0, 10, seed=7), w[:10])
    # larger concentration = closer to the centre
    assert sample_mixtures(center, 100.0, 2000, seed=1).std(0).max() < w.std(0).min()


@pytest.mark.parametrize("bad", [[0.5, 0.0, 0.5], [1.0, -1.0], [np.nan, 1.0]])
def test_dirichlet_refuses_non_positive_centres(bad):
    with pytest.raises(ValueError, match="positive"):
        sample_mixtures(np.array(bad), 5.0, 3, seed=0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, size=15).astype(float)  # ties on purpose
        b = a + rng.normal(size=15)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _quadratic_oracle(w: np.ndarray) -> np.ndarray:
    """A convex bowl with its minimum inside the simplex at (0.2, 0.5, 0.3)."""
    opt = np.array([0.2, 0.5, 0.3])
    return 2.0 + ((w - opt) ** 2 * np.array([3.0, 1.0, 2.0])).sum(1)


@pytest.mark.parametrize("model", ["quadratic", "kernel"])
def test_regression_recovers_a_quadratic_metric_and_its_minimum(model):
    center = np.array([1 / 3, 1 / 3, 1 / 3])
    w = sample_mixtures(center, 3.0, 40, seed=1)
    y = _quadratic_oracle(w)
    cv = cross_validate(w, y, model, folds=5)
    assert cv.spearman > 0.97 and cv.n == 40 and cv.scheme == "5-fold"
    reg = fit(w, y, model)
    best, predicted = best_mixture(reg, center, 3.0, maximize=False, candidates=20_000, top_k=20, seed=2)
    assert np.abs(best - [0.2, 0.5, 0.3]).max() < 0.05
    assert predicted == pytest.approx(_quadratic_oracle(best[None])[0], abs=0.02)


def test_linear_metric_is_exact_and_its_best_mixture_leans_to_the_best_source():
    center = np.array([0.4, 0.4, 0.2])
    w = sample_mixtures(center, 5.0, 12, seed=3)
    y = w @ np.array([1.0, 3.0, 2.0])  # accuracy-like: maximise -> as much of source 1 as the prior allows
    cv = cross_validate(w, y, "linear", heldout=0.25)
    assert cv.spearman == pytest.approx(1.0) and cv.scheme == "holdout 0.25" and cv.n == 3
    assert cv.mae < 1e-3
    reg = fit(w, y, "linear")
    best, _ = best_mixture(reg, center, 5.0, maximize=True, candidates=5000, top_k=10, seed=0)
    assert best[1] > 0.75  # far above its prior share 0.4


def test_noise_is_not_predictable():
    w = sample_mixtures(np.array([0.5, 0.5]), 5.0, 30, seed=0)
    y = np.random.default_rng(1).normal(size=30)
    assert abs(cross_validate(w, y, "quadratic").spearman) < 0.5


def test_too_few_proxies_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        cross_validate(np.array([[0.5, 0.5], [0.4, 0.6]]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown regression model"):
        fit(np.eye(3), np.ones(3), "lightgbm")
