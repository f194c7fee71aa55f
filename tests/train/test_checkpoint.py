"""Checkpoints: exact round trip, manifest verification, pruning, incomplete directories ignored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from midtrain.train import checkpoint as ckpt


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randint(0, 10, (4,))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"hello": 1}, is_main=True, keep_last=2)
    assert path.name == "step-7" and ckpt.latest_checkpoint(tmp_path) == path
    ckpt.verify(path)
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    ckpt.load_weights(path, fresh)
    ckpt.load_optimizer(path, fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], fresh_opt.state[b][key])
    assert ckpt.read_trainer_state(path) == {"hello": 1}


def test_rng_state_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, is_main=True, keep_last=1)
    expected = torch.rand(3)
    torch.manual_seed(999)
    ckpt.load_rng(path)
    assert torch.equal(torch.rand(3), expected)


def test_keep_last_prunes_but_protects(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, is_main=True, keep_last=2, protect=(2,))
    assert ckpt.complete_steps(tmp_path) == [2, 6, 8]


def test_verify_names_the_corrupted_file(tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {}, is_main=True, keep_last=1)
    target = path / ckpt.OPTIM_FILE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: checksum mismatch"):
        ckpt.verify(path)


def test_directories_without_manifest_are_not_checkpoints(tmp_path):
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-10.tmp-123").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {}, is_main=True, keep_last=3)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-5"
    assert not (tmp_path / "step-10.tmp-123").exists()  # stale temp dirs are cleaned up


def test_weights_only_checkpoint_refuses_optimizer_load(tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 1, model, None, {}, is_main=True, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match="no optimizer state"):
        ckpt.load_optimizer(path, model, opt)
