"""Synthetic evaluation tasks, generated offline and seeded: passkey, NIAH grid, RULER-style, arithmetic."""

from midtrain.eval.tasks.arith import arith_samples
from midtrain.eval.tasks.base import Sample, TokenCounter, max_new_tokens, mean_by_metric, prompt_room, score
from midtrain.eval.tasks.retrieval import niah_grid, niah_samples, passkey_samples
from midtrain.eval.tasks.ruler import ruler_samples

__all__ = ["Sample", "TokenCounter", "arith_samples", "max_new_tokens", "mean_by_metric", "niah_grid",
           "niah_samples", "passkey_samples", "prompt_room", "ruler_samples", "score"]
