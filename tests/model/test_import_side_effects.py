"""Importing midtrain.model changes nothing in transformers; forward_packed installs the sdpa wrapper it needs."""

from __future__ import annotations

import os
import subprocess
import sys

_PROBE = """
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
before = ALL_ATTENTION_FUNCTIONS["sdpa"]
import midtrain.model, midtrain.model.attention, midtrain.model.loss  # noqa: E401
assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before, "importing midtrain.model re-registered sdpa"
import torch
from midtrain.model import build_model, forward_packed, preset_config
model = build_model(preset_config("tiny-llama", 64), seed=0)
assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before, "building a model re-registered sdpa"
pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
forward_packed(model, {"input_ids": torch.zeros_like(pos), "position_ids": pos}, segments=True)
wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
assert wrapped.__name__ == "sdpa_with_document_segments" and wrapped.__wrapped__ is before
print("ok")
"""


def test_import_registers_nothing_and_forward_packed_installs_the_wrapper():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
