"""Synthetic evaluation tasks, generated offline and seeded: passkey, NIAH grid, RULER-style, arithmetic."""

from midtrain.eval.tasks.arith import arith_samples
from midtrain.eval.tasks.base import Sample, TokenCounter, mean_by_metric, score
from midtrain.eval.tasks.retrieval import niah_grid, niah_samples, passkey_samples
from midtrain.eval.tasks.ruler import ruler_samples

__all__ = ["Sample", "TokenCounter", "arith_samples", "mean_by_metric", "niah_grid", "niah_samples",
           "passkey_samples", "ruler_samples", "score"]
