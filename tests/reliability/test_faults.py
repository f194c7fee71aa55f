"""midtrain.faults: spec parsing, seeded occurrences, markers, and each action (the kill one in a child process)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import timeit

import pytest
import torch

from midtrain import faults


@pytest.fixture(autouse=True)
def disarmed():
    yield
    faults.configure(None)


def test_parse_counts_actions_and_errors():
    parsed = faults.parse("ckpt.mid_write:2, train.mid_step:1:nan")
    assert (parsed["ckpt.mid_write"].occurrence, parsed["ckpt.mid_write"].action) == (2, "kill")
    assert (parsed["train.mid_step"].occurrence, parsed["train.mid_step"].action) == (1, "nan")
    for bad, match in [("nope:1", "unknown point"), ("ckpt.mid_write:0", ">= 1"), ("ckpt.mid_write:x", "N or LO-HI"),
                       ("ckpt.mid_write:1:boom", "unknown action"), ("ckpt.mid_write", "POINT:N"),
                       ("ckpt.mid_write:5-2", "LO <= HI")]:
        with pytest.raises(faults.FaultSpecError, match=match):
            faults.parse(bad)


def test_ranges_are_drawn_by_the_seed():
    draws = {seed: faults.parse("train.mid_step:1-100", seed)["train.mid_step"].occurrence for seed in range(20)}
    assert all(1 <= n <= 100 for n in draws.values()) and len(set(draws.values())) > 10
    assert draws == {seed: faults.parse("train.mid_step:1-100", seed)["train.mid_step"].occurrence
                     for seed in range(20)}  # same seed, same occurrence


def test_unarmed_points_do_nothing_and_cost_little():
    faults.configure(None)
    assert faults.armed() is None
    faults.point("ckpt.mid_write")
    per_call = min(timeit.repeat(lambda: faults.point("train.mid_step"), number=20000, repeat=3)) / 20000
    assert per_call < 5e-6  # a global lookup and a return (~0.1 us); the bound leaves room for a loaded machine


def test_enospc_on_the_chosen_occurrence_with_a_marker(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv(faults.MARKER_ENV, str(marker))
    faults.configure("export.mid_write:3:enospc")
    faults.point("export.mid_write")
    faults.point("ckpt.mid_write")  # other points are not counted
    faults.point("export.mid_write")
    assert faults.read_marker(marker) == []
    with pytest.raises(OSError) as info:
        faults.point("export.mid_write")
    assert info.value.errno == errno.ENOSPC
    assert faults.read_marker(marker) == [("export.mid_write", 3, "enospc", os.getpid())]
    faults.point("export.mid_write")  # only the chosen occurrence acts


def test_nan_poisons_gradients():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    faults.configure("train.mid_step:1:nan")
    faults.point("train.mid_step", layer.parameters)
    assert all(torch.isnan(p.grad).all() for p in layer.parameters())


def _child(marker: str) -> None:
    os.environ[faults.MARKER_ENV] = marker
    faults.configure("tokenize.mid_write:2")
    faults.point("tokenize.mid_write")
    faults.point("tokenize.mid_write")
    os._exit(0)  # not reached


def test_kill_is_sigkill_after_the_marker(tmp_path):
    marker = tmp_path / "marker"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(marker),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert faults.read_marker(marker) == [("tokenize.mid_write", 2, "kill", proc.pid)]


def test_environment_arms_points_at_import(tmp_path):
    code = "from midtrain import faults; print(faults.armed()['curate.mid_write'].occurrence)"
    env = {**os.environ, faults.ENV: "curate.mid_write:4-9", faults.SEED_ENV: "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == faults.parse("curate.mid_write:4-9", 3)["curate.mid_write"].occurrence
