"""Mixture weights -> metric: Dirichlet sampling, a small (kernel) ridge regression, rank correlation, simplex search.

RegMix (Liu et al. 2024) fits LightGBM on a few hundred proxies; with tens of proxies a ridge regression on the
weights and their pairwise products (a quadratic response surface) or an RBF kernel ridge does as well and needs
nothing beyond numpy. Every model is fitted in its dual form, f(w) = mean(y) + sum_i a_i k(w, w_i), so the ridge
strength is picked by the closed-form leave-one-out error (no inner loop), and the same code serves every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODELS = ("linear", "quadratic", "kernel")


def auto_model(n: int, k: int) -> str:
    """quadratic once there are two proxies per coefficient, else linear. On the simplex (weights sum to 1) a
    quadratic in k weights has k(k+1)/2 free coefficients; with fewer proxies than twice that the fit interpolates
    their noise (measured: a 4-proxy quadratic search predicted a corner mixture that lost to uniform)."""
    return "quadratic" if n >= k * (k + 1) else "linear"


# --------------------------------------------------------------------------- sampling


def dirichlet_alpha(center: np.ndarray, concentration: float) -> np.ndarray:
    """Dirichlet parameters whose mean is `center`: alpha = c * center (larger c = samples closer to the centre)."""
    center = np.asarray(center, dtype=np.float64)
    if center.ndim != 1 or center.size == 0 or np.any(~np.isfinite(center)) or np.any(center <= 0):
        raise ValueError(f"the centre must be positive weights, got {center.tolist()}")
    if not (np.isfinite(concentration) and concentration > 0):
        raise ValueError(f"concentration must be > 0, got {concentration}")
    return concentration * center / center.sum()


def sample_mixtures(center: np.ndarray, concentration: float, n: int, seed: int) -> np.ndarray:
    """`n` mixtures (rows summing to 1) from Dirichlet(c * center), drawn one by one from one seeded generator, so
    the first n of a larger draw are exactly these (a search extended with more proxies keeps the ones it has)."""
    alpha = dirichlet_alpha(center, concentration)
    rng = np.random.default_rng(seed)
    rows = np.array([rng.dirichlet(alpha) for _ in range(n)]).reshape(n, alpha.size)
    return rows / rows.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- rank correlation


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; nan when either side is constant or there are fewer than 3 pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f"spearman: {a.size} vs {b.size} values")
    if a.size < 3:
        return float("nan")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (b.size + 1) / 2
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------- regression


def _features(w: np.ndarray, model: str) -> np.ndarray:
    if model == "linear":
        return w
    i, j = np.triu_indices(w.shape[1])
    return np.hstack([w, w[:, i] * w[:, j]])


@dataclass
class Regressor:
    """A fitted dual ridge model: predict(w) = y_mean + gram(w, train) @ coef."""

    model: str
    lam: float
    train: np.ndarray  # features (linear/quadratic, centred) or weights (kernel) of the training mixtures
    coef: np.ndarray
    y_mean: float
    x_mean: np.ndarray | None = None  # feature means (linear/quadratic)
    gamma: float = 0.0  # RBF width (kernel)

    def _inputs(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        return w if self.model == "kernel" else _features(w, self.model) - self.x_mean

    def predict(self, w: np.ndarray, chunk: int = 8192) -> np.ndarray:
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        out = np.empty(w.shape[0])
        for start in range(0, w.shape[0], chunk):  # bounded memory for 1e5+ candidates x many proxies
            x = self._inputs(w[start:start + chunk])
            out[start:start + chunk] = self.y_mean + _gram(x, self.train, self.model, self.gamma) @ self.coef
        return out


def _gram(a: np.ndarray, b: np.ndarray, model: str, gamma: float) -> np.ndarray:
    if model != "kernel":
        return a @ b.T
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-gamma * np.maximum(sq, 0.0))


LAMBDA_GRID = np.logspace(-8, 1, 19)  # relative to the mean diagonal of the Gram matrix


def fit(w: np.ndarray, y: np.ndarray, model: str = "quadratic") -> Regressor:
    """Fits `model` to mixtures `w` (n x k) and metric `y`; the ridge strength minimises the leave-one-out error."""
    if model not in MODELS:
        raise ValueError(f"unknown regression model {model!r}; choose one of {', '.join(MODELS)}")
    w, y = np.asarray(w, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != y.size or y.size < 2:
        raise ValueError(f"need at least 2 mixtures with one value each (got {w.shape} weights, {y.size} values)")
    x_mean, gamma = None, 0.0
    if model == "kernel":
        x = w
        sq = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)
        median = np.median(sq[np.triu_indices(len(w), 1)]) if len(w) > 1 else 1.0
        gamma = 1.0 / median if median > 0 else 1.0
    else:
        feats = _features(w, model)
        x_mean = feats.mean(0)
        x = feats - x_mean
    gram = _gram(x, x, model, gamma)
    y_mean = float(y.mean())
    yc = y - y_mean
    scale = max(float(np.mean(np.diag(gram))), 1e-12)
    best = None
    for rel in LAMBDA_GRID:
        lam = rel * scale
        inv = np.linalg.inv(gram + lam * np.eye(len(y)))
        coef = inv @ yc
        loo = coef / np.diag(inv)  # leave-one-out residuals of kernel ridge, in closed form
        err = float(np.mean(loo * loo))
        if best is None or err < best[0] - 1e-15:
            best = (err, lam, coef)
    _, lam, coef = best
    return Regressor(model=model, lam=float(lam), train=x, coef=coef, y_mean=y_mean, x_mean=x_mean, gamma=gamma)


@dataclass(frozen=True)
class CVResult:
    spearman: float  # rank correlation of held-out predictions with the measured values
    mae: float  # mean absolute error of the held-out predictions
    n: int  # held-out predictions made
    scheme: str  # "5-fold" or "holdout 0.25"
    predictions: list[float | None]  # per proxy, its held-out prediction (None: never held out)


def cross_validate(w: np.ndarray, y: np.ndarray, model: str = "quadratic", folds: int = 5,
                   heldout: float | None = None, seed: int = 0) -> CVResult:
    """Held-out rank correlation: k-fold (every proxy predicted once by a model that never saw it), or one random
    split holding out the fraction `heldout`."""
    w, y = np.asarray(w, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = y.size
    order = np.random.default_rng(seed).permutation(n)
    if heldout is not None:
        if not 0 < heldout < 1:
            raise ValueError(f"heldout fraction must lie in (0, 1), got {heldout}")
        n_test = min(n - 2, max(1, round(heldout * n)))
        splits = [order[:n_test]]
        scheme = f"holdout {heldout:g}"
    else:
        k = min(max(2, folds), n)
        splits = [s for s in np.array_split(order, k) if s.size]
        scheme = f"{k}-fold" if k < n else "leave-one-out"
    if n - max(s.size for s in splits) < 2:
        raise ValueError(f"{n} proxies are too few to hold any out (need at least 3)")
    pred = np.full(n, np.nan)
    for test in splits:
        train = np.setdiff1d(np.arange(n), test)
        pred[test] = fit(w[train], y[train], model).predict(w[test])
    done = ~np.isnan(pred)
    return CVResult(spearman=spearman(pred[done], y[done]), mae=float(np.mean(np.abs(pred[done] - y[done]))),
                    n=int(done.sum()), scheme=scheme,
                    predictions=[None if np.isnan(p) else float(p) for p in pred])


def best_mixture(reg: Regressor, center: np.ndarray, concentration: float, *, maximize: bool,
                 candidates: int = 100_000, top_k: int = 100, seed: int = 0) -> tuple[np.ndarray, float]:
    """The predicted best mixture: score many Dirichlet candidates drawn like the proxies (the region the model has
    seen; it extrapolates poorly beyond), average the `top_k` best (RegMix's trick against a noisy argmax)."""
    alpha = dirichlet_alpha(center, concentration)
    cand = np.random.default_rng(seed).dirichlet(alpha, size=candidates)
    cand /= cand.sum(1, keepdims=True)
    scores = reg.predict(cand)
    scores = -scores if maximize else scores
    top = np.argsort(scores, kind="stable")[: max(1, min(top_k, candidates))]
    best = cand[top].mean(0)
    best /= best.sum()
    return best, float(reg.predict(best[None])[0])
