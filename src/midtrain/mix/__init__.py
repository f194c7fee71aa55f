"""Data mixtures beyond hand-set weights: RegMix-style search (`search.py`), DoReMi (`doremi.py`) and microanneal
valuation (`value.py`), all built on proxy runs of a recipe's stage (`proxy.py`); the regression is plain numpy
(`regress.py`)."""

from midtrain.mix.proxy import MixError, MixRunError

__all__ = ["MixError", "MixRunError"]
