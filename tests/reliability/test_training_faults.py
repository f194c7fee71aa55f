"""Skipped-batch document ids, checkpoint fallback and write-failure messages (unit level, no subprocesses)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from midtrain.data import byte_tokenizer, tokenize_source
from midtrain.data.loader import PAD, PackedLoader
from midtrain.train import checkpoint as ckpt
from midtrain.train.rollback import DocumentLedger

from ..data.corpus import random_texts, write_jsonl


@pytest.mark.parametrize("split_documents", [True, False])
def test_ledger_names_exactly_the_documents_a_batch_drew(tmp_path, split_documents):
    """Oracle: the loader's own row segments (source, start, length), mapped to documents through the offsets."""
    tok = byte_tokenizer()
    sources = [tokenize_source(name, write_jsonl(tmp_path / f"{name}.jsonl", texts), "text", tok, holdout_docs=0,
                               cache_dir=tmp_path / "cache")
               for name, texts in [("long", random_texts(40, seed=1, lo=20, hi=300)),
                                   ("few", random_texts(3, seed=2, lo=5, hi=40))]]  # `few` wraps into new epochs
    loader = PackedLoader(sources, [0.6, 0.4], seq_len=48, global_batch_seqs=4, seed=5, micro_batch=2,
                          split_documents=split_documents)
    segments: list = []
    real_next_row = loader._next_row
    loader._next_row = lambda: segments.extend(row := real_next_row()) or row
    ledger = DocumentLedger(loader, loader)
    for _ in range(25):
        segments.clear()
        ledger.next_step()
        expected: dict[str, set[int]] = {}
        for s, start, n in segments:
            if s != PAD and n:
                doc = int(np.searchsorted(sources[s].offsets, start, side="right")) - 1
                expected.setdefault(sources[s].name, set()).add(doc)
        listed = ledger.last_documents()
        assert {k: set(v) for k, v in listed.items()} == expected
        assert all(len(v) == len(set(v)) or k == "few" for k, v in listed.items())  # repeats only across epochs
    assert loader.epochs()["few"] > 2


def test_ledger_adds_documents_to_skipped_rows_only(tmp_path):
    class Stub:
        sources = []

        def source_cursors(self):
            return {}

    ledger = DocumentLedger(Stub(), Stub())
    ledger.span = ({}, {})
    row, skipped = {"loss": 1.0}, {"loss": float("nan"), "skipped": "nonfinite"}
    ledger.on_step_end(None, row)
    ledger.on_step_end(None, skipped)
    assert "skipped_docs" not in row and skipped["skipped_docs"] == {}


def _checkpoint(root, step: int) -> None:
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(root, step, model, None, {"trainer": {}}, is_main=True, keep_last=5)


def test_resume_point_refuses_or_falls_back(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    (tmp_path / "step-8").mkdir()  # killed before its manifest: never a candidate
    assert ckpt.resume_point(tmp_path) == (tmp_path / "step-6", [])
    weights = tmp_path / "step-6" / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ckpt.CheckpointError, match="step-6/model.safetensors: checksum mismatch.*--fallback"):
        ckpt.resume_point(tmp_path)
    path, problems = ckpt.resume_point(tmp_path, fallback=True)
    assert path == tmp_path / "step-4" and len(problems) == 1 and str(weights) in problems[0]
    assert ckpt.resume_point(tmp_path, fallback=True, before=4)[0] == tmp_path / "step-2"
    (tmp_path / "step-4" / ckpt.MANIFEST).write_text("{not json")
    (tmp_path / "step-2" / ckpt.MANIFEST).write_text(json.dumps({"files": {"../../etc/passwd": {}}}))
    path, problems = ckpt.resume_point(tmp_path, fallback=True)  # none verifies: the caller starts the stage over
    assert path is None and len(problems) == 3
    assert "unreadable manifest" in problems[1] and "bad file name" in problems[2]
    with pytest.raises(ckpt.CheckpointError, match="step-6/model.safetensors: checksum mismatch"):
        ckpt.resume_point(tmp_path)  # without the flag: the newest one's error, nothing else tried


def test_write_errors_say_disk_full_and_name_the_path(tmp_path, monkeypatch):
    target = tmp_path / "step-4.tmp-1"
    target.mkdir()
    (target / "optimizer.pt").write_bytes(b"x" * 10)
    full = OSError(errno.ENOSPC, "No space left on device", str(target / "rng.pt"))
    assert ckpt.write_error(full, target) == f"{target / 'rng.pt'}: disk full (ENOSPC)"
    assert "disk full" in ckpt.write_error(RuntimeError("Error while serializing: I/O error: (os error 28)"), target)
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (10, 10))
    message = ckpt.write_error(RuntimeError("unexpected pos 704 vs 598"), target)
    assert message == f"{target / 'optimizer.pt'}: file size limit exceeded (EFBIG; RLIMIT_FSIZE = 10 bytes)"


def test_save_failure_removes_the_partial_and_keeps_the_previous(tmp_path, monkeypatch):
    from midtrain import faults

    _checkpoint(tmp_path, 2)
    faults.configure("ckpt.mid_write:1:enospc")
    try:
        with pytest.raises(ckpt.CheckpointError) as info:
            _checkpoint(tmp_path, 4)
    finally:
        faults.configure(None)
    message = str(info.value)
    assert "disk full (ENOSPC)" in message and "step-4.tmp-" in message and "step-2 is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    ckpt.verify(tmp_path / "step-2")


@pytest.mark.slow
def test_a_fault_that_keeps_coming_back_stops_after_max_rollbacks(tmp_path, monkeypatch):
    """NaN logits from the 5th training forward on: step 5 rolls back to 4 and is skipped on replay, step 6 rolls
    back to 4 too; both skipped, step-6 is saved; step 7 would be a 3rd roll-back: the run stops with a clear error
    instead of looping (in-process; the tiny recipe, a checkpoint every 2 steps)."""
    import math

    import midtrain.run.stage as run_module
    from midtrain.config import load_recipe
    from midtrain.run import RunOptions, run
    from midtrain.train.rollback import RollbackError

    from ..train.tiny import write_recipe

    real, calls = run_module.forward_packed, {"n": 0}

    def forward(model, batch, **kw):
        logits = real(model, batch, **kw)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                return logits * math.nan
        return logits

    monkeypatch.setattr(run_module, "forward_packed", forward)
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=4096, anneal_tokens=512, every=1024),
                         [f"run_dir={tmp_path / 'run'}", "stages.warm.batch.micro=null",
                          "step_guard.on_fault=rollback", "step_guard.max_rollbacks=2"])
    with pytest.raises(RollbackError, match=r"step 7 nonfinite after 2 roll-backs .*checkpoints/warm/step-6"):
        run(recipe, RunOptions(progress=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["fault_step"], r["to_step"]) for r in rows if r["event"] == "rollback"] == [(5, 4), (6, 4)]
    train = [r for r in rows if r["event"] == "train"]
    assert [(r["step"], r.get("skipped")) for r in train] == [(1, None), (2, None), (3, None), (4, None),
                                                             (5, "rollback"), (6, "rollback")]
