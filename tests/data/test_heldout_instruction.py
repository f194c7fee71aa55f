"""Held-out loss of an instruction source scores its response tokens only, as training does.

Oracle: run the model on the held-out sample alone and compute cross-entropy by hand (log-softmax, gather) over the
positions whose loss mask is 1; the run's held-out batches (midtrain.run.setup.heldout_batches) packed with a text document
must give the same per-domain loss, and a text source still scores every token.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from midtrain.data import byte_tokenizer, tokenize_source
from midtrain.data.instruct import InstructionFormat
from midtrain.eval.heldout import heldout_metrics
from midtrain.model import build_model, forward_packed
from midtrain.model.presets import preset_config
from midtrain.run.setup import heldout_batches

from .corpus import prose_texts, write_jsonl


def _hand_loss(model, doc: np.ndarray, mask: np.ndarray | None) -> float:
    ids = torch.as_tensor(doc.astype(np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), dim=-1)
    scored = [t for t in range(1, len(doc)) if mask is None or mask[t]]  # position 0 is never predicted
    return -sum(float(logp[t - 1, int(doc[t])]) for t in scored) / len(scored)


def test_heldout_loss_of_instruction_source_scores_response_tokens_only(tmp_path):
    tok = byte_tokenizer()
    qa = tmp_path / "qa.jsonl"
    with open(qa, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"What is {i} plus {i + 3}? Answer briefly, please.",
                                "response": f"It is {2 * i + 3}."}) + "\n")
    chat = tokenize_source("qa", qa, "text", tok, holdout_docs=1, cache_dir=tmp_path / "c",
                           instruction=InstructionFormat(template="simple"))
    prose = tokenize_source("prose", write_jsonl(tmp_path / "p.jsonl", prose_texts(8)), "text", tok,
                            holdout_docs=1, cache_dir=tmp_path / "c")
    [doc], [mask] = chat.holdout_docs(), chat.holdout_masks()
    assert mask is not None and 0 < mask.sum() < len(mask) and prose.holdout_masks() == [None]

    model = build_model(preset_config("tiny-llama", len(tok)), seed=0).eval()
    ctx = SimpleNamespace(recipe=SimpleNamespace(stages=[SimpleNamespace(eval=SimpleNamespace(max_docs=4))]),
                          sources=[prose, chat])
    batches = heldout_batches(ctx, SimpleNamespace(index=0, seq_len=1024))
    assert len(batches) == 1 and int((batches[0]["position_ids"] == 0).sum()) >= 2  # both packed in one row
    got = heldout_metrics(model, forward_packed, batches, ["general", "chat"], device=torch.device("cpu"),
                          precision="fp32")

    want_chat = _hand_loss(model, np.asarray(doc), np.asarray(mask))
    every_token = _hand_loss(model, np.asarray(doc), None)
    assert abs(want_chat - every_token) > 1e-2  # the test can tell the two apart
    assert got["loss.chat"] == pytest.approx(want_chat, abs=1e-4)
    [prose_doc] = prose.holdout_docs()
    assert got["loss.general"] == pytest.approx(_hand_loss(model, np.asarray(prose_doc), None), abs=1e-4)
