"""What drives stages: `midtrain run` from recipe to trained, evaluated, exported stages.

`train/` is the training loop and its parts; this package decides which stage runs, from what state, with which
evaluations and exports (context, preflight, setup, stage, evaluate, export, branches, record, driver), and writes
the run directory through `midtrain.layout`.
"""

from midtrain.run.context import RunError, RunOptions
from midtrain.run.driver import run
from midtrain.run.evaluate import EXIT_GATE, GateFailed
from midtrain.run.export import PROBE_FILE
from midtrain.run.preflight import Preflight, Problem, preflight
from midtrain.run.setup import resolve_tokenizer

__all__ = ["EXIT_GATE", "PROBE_FILE", "GateFailed", "Preflight", "Problem", "RunError", "RunOptions", "preflight",
           "resolve_tokenizer", "run"]
