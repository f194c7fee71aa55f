"""Data-parallel runs (torchrun, gloo on CPU) against single-process runs of the same recipe.

What must hold (docs/DISTRIBUTED.md):
* ddp and fsdp2 on 2 ranks train the same model as 1 process: per-step losses, grad norms, LRs and held-out losses
  agree for every step of both stages, and so do the exported weights;
* checkpoints are world-size independent: a 2-rank run killed mid-stage resumes on 1 process and vice versa,
  continuing exactly where the uninterrupted run went, with no duplicated metric rows;
* a global batch that does not split over the ranks is a one-line error, not a traceback.

Tolerances. Ranks sum their gradients and losses in a different order than one process does, so fp32 rounding
differs. Observed on the CI CPU: per-step loss <= 5e-8 relative, grad norm <= 1e-6 relative, exported weights
<= 3e-7 absolute. The assertions allow LOSS_RTOL = 1e-5, GRAD_RTOL = 1e-4, WEIGHT_ATOL = 1e-5: 10-100x slack for
other BLAS/thread counts, far below the 1e-2-scale differences a real bug (a wrong sample order, a lost optimizer
state, a mis-normalised loss) produces. The grad norm is compared because Adam's update is almost invariant to a
gradient scale: a loss normalised by the local instead of the global token count would leave the losses close but
the grad norm off by the world size.

All runs use fp32 (bf16 is emulated and ~70x slower on CPUs without AVX512-BF16/AMX).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import midtrain

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
WEIGHT_ATOL = 1e-5

SEQ_LEN = 64
STAGES = ("s1", "s2")
STEPS = {"s1": 6, "s2": 4}  # batch.tokens 512 = 8 sequences of 64; 3072 and 2048 tokens
TOTAL_STEPS = sum(STEPS.values())

# Checkpoints every 1024 tokens = every 2 steps: s1 at steps 2, 4, 6 (keep_last 2 prunes step 2), s2 at 8 and 10.
# Held-out validation every 1024 tokens too, so in-stage evaluation also runs under ddp / fsdp2.
RECIPE = """\
base: preset:tiny-llama
tokenizer: bytes
seed: 0
precision: fp32
sources:
  - {name: prose, path: corpus/prose.jsonl, domain: general, holdout_docs: 8}
  - {name: code, path: corpus/code.jsonl, holdout_docs: 8}
checkpoint: {every_tokens: 1024, keep_last: 2}
stages:
  - name: s1
    init: scratch
    tokens: 3072
    seq_len: 64
    batch: {tokens: 512, micro: 2}
    schedule: {kind: constant, peak_lr: 3e-3, warmup_tokens: 1024}
    data: {mixture: {prose: 0.6, code: 0.4}}
    eval: {every_tokens: 1024, max_docs: 4}
  - name: s2
    init: weights+optimizer
    start_lr: from_previous
    tokens: 2048
    seq_len: 64
    batch: {tokens: 512, micro: 2}
    schedule: {kind: wsd, decay_fraction: 1.0, decay_shape: linear, min_lr: 0}
    data: {mixture: {code: 0.7, prose: 0.3}}
    eval: {every_tokens: 1024, max_docs: 4}
"""


# --------------------------------------------------------------------------- helpers


def _write_corpus(root: Path) -> None:
    rng = random.Random(0)
    words = ("the of and a to in is was that for on as with by at from his her it an were are which this be or has "
             "had not but their model data token stage learning rate").split()
    prose = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))).capitalize() + "." for _ in range(300)]
    code = [
        "".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 99)} + {rng.randint(0, 999)}\n"
                for j in range(rng.randint(1, 3)))
        for i in range(300)
    ]
    for name, texts in (("prose", prose), ("code", code)):
        path = root / "corpus" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


class Workspace:
    """A recipe + corpus in a tmp dir, a private tokenization cache, and runs of it (each full run done once)."""

    def __init__(self, root: Path):
        self.root = root
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text(RECIPE)
        _write_corpus(root)
        self._full: dict[str, Path] = {}

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env["MIDTRAIN_CACHE"] = str(self.root / "cache")
        env["PYTHONUNBUFFERED"] = "1"
        # If pytest itself runs under a launcher, the children must not inherit its process group.
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
            env.pop(key, None)
        return env

    def run(self, run_dir: Path, mode: str = "none", *sets: str, nproc: int | None = None
            ) -> subprocess.CompletedProcess:
        """`midtrain run` with 1 process (mode none) or `torchrun --nproc-per-node 2` (ddp / fsdp2).

        Under torchrun each rank's output is also written to run_dir.parent/<run_dir.name>-logs/<id>/attempt_0/<rank>/.
        """
        nproc = nproc if nproc is not None else (1 if mode == "none" else 2)
        args = ["run", str(self.recipe), "--set", f"run_dir={run_dir}", *(a for s in sets for a in ("--set", s))]
        if nproc == 1:
            cmd = [sys.executable, "-m", "midtrain", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   f"--log-dir={self.log_dir(run_dir)}", "--tee=3", "-m", "midtrain", *args,
                   "--set", f"distributed={mode}"]
        return subprocess.run(cmd, cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=400)

    @staticmethod
    def log_dir(run_dir: Path) -> Path:
        return run_dir.with_name(run_dir.name + "-logs")

    def full(self, mode: str) -> Path:
        """A complete run of the recipe with `mode` (none = 1 process), shared by the tests of this module."""
        if mode not in self._full:
            run_dir = self.root / f"full-{mode}"
            proc = self.run(run_dir, mode)
            assert proc.returncode == 0, _explain(proc)
            if mode != "none":
                assert len(_rank_logs(self.log_dir(run_dir), "stdout.log")) == 2, "torchrun did not start 2 ranks"
            self._full[mode] = run_dir
        return self._full[mode]


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def _rank_logs(log_dir: Path, name: str) -> list[Path]:
    return sorted(log_dir.glob(f"*/attempt_*/*/{name}"))


def _rows(run_dir: Path, event: str | None = None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if event is None or r["event"] == event]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _assert_rows_close(ref: list[dict], got: list[dict], what: str) -> None:
    """Same steps in the same order; every loss / grad norm / LR within tolerance (train and val rows)."""
    assert [(r["step"], r["stage"]) for r in got] == [(r["step"], r["stage"]) for r in ref], what
    for a, b in zip(ref, got):
        where = f"{what}: {a['event']} row at step {a['step']} ({a['stage']})"
        loss_keys = sorted(k for k in a if k == "loss" or k.startswith(("loss.", "val_loss")))
        assert loss_keys and loss_keys == sorted(k for k in b if k == "loss" or k.startswith(("loss.", "val_loss")))
        for key in loss_keys:
            assert _rel(a[key], b[key]) <= LOSS_RTOL, f"{where}: {key} {b[key]!r} != {a[key]!r}"
        if a["event"] == "train":
            assert _rel(a["grad_norm"], b["grad_norm"]) <= GRAD_RTOL, (
                f"{where}: grad_norm {b['grad_norm']} != {a['grad_norm']}")
            assert _rel(a["lr"], b["lr"]) <= 1e-12, f"{where}: lr {b['lr']} != {a['lr']}"
            assert (a["tokens"], a["stage_step"]) == (b["tokens"], b["stage_step"]), where


def _assert_weights_close(ref_file: Path, got_file: Path) -> None:
    ref, got = load_file(str(ref_file)), load_file(str(got_file))
    assert sorted(ref) == sorted(got), f"{got_file}: tensor names differ from {ref_file}"
    for name, tensor in ref.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, f"{got_file}: {name}"
        diff = (got[name] - tensor).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{got_file}: {name} differs by {diff:.3g} (> {WEIGHT_ATOL})"


def _simulate_crash(run_dir: Path, stage: str, step: int) -> None:
    """Leaves `run_dir` as a kill right after `checkpoints/<stage>/step-<step>` was written would have left it.

    Later checkpoints, the exports and after-evals of `stage` and later stages, and the before-evals of later stages
    are deleted. metrics.jsonl is kept whole: its rows past `step` are what a crash between logging and the next
    checkpoint leaves behind, and the resumed run must drop them.
    """
    i = STAGES.index(stage)
    ckpt_root = run_dir / "checkpoints" / stage
    assert (ckpt_root / f"step-{step}" / "manifest.json").is_file(), f"no complete mid-stage checkpoint step-{step}"
    for child in ckpt_root.iterdir():
        if int(child.name.split("-")[1].split(".")[0]) > step:
            shutil.rmtree(child)
    for later in STAGES[i:]:
        shutil.rmtree(run_dir / "stages" / later / "hf", ignore_errors=True)
        (run_dir / "eval" / f"{later}.json").unlink(missing_ok=True)
        if later != stage:
            shutil.rmtree(run_dir / "checkpoints" / later, ignore_errors=True)
            (run_dir / "eval" / f"{later}-before.json").unlink(missing_ok=True)
    assert max(r["step"] for r in _rows(run_dir, "train")) > step  # the rows the resume must supersede


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("distributed"))


# --------------------------------------------------------------------------- 1. same numbers at any world size


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(ws: Workspace, mode: str):
    single, parallel = ws.full("none"), ws.full(mode)

    ref = _rows(single, "train")
    assert [r["step"] for r in ref] == list(range(1, TOTAL_STEPS + 1))
    assert [r["stage"] for r in ref] == [s for s in STAGES for _ in range(STEPS[s])]
    _assert_rows_close(ref, _rows(parallel, "train"), f"{mode} train")
    ref_val = _rows(single, "val")
    assert {r["stage"] for r in ref_val} == set(STAGES)  # in-stage validation ran in both stages
    _assert_rows_close(ref_val, _rows(parallel, "val"), f"{mode} val")

    for stage in STAGES:
        _assert_weights_close(single / "stages" / stage / "hf" / "model.safetensors",
                              parallel / "stages" / stage / "hf" / "model.safetensors")
        assert json.loads((parallel / "eval" / f"{stage}.json").read_text())["step"] == sum(
            STEPS[s] for s in STAGES[: STAGES.index(stage) + 1])

    # Checkpoints hold full, unsharded tensors and the optimizer state keyed by name, whatever the world size.
    for step_dir in ("s1/step-4", "s2/step-10"):
        a, b = single / "checkpoints" / step_dir, parallel / "checkpoints" / step_dir
        _assert_weights_close(a / "model.safetensors", b / "model.safetensors")
        opt_a = torch.load(a / "optimizer.pt", weights_only=False)
        opt_b = torch.load(b / "optimizer.pt", weights_only=False)
        assert sorted(opt_a["state"]) == sorted(opt_b["state"]) and len(opt_a["state"]) > 0
        for name, st in opt_a["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt_b["state"][name][key].shape == st[key].shape, f"{step_dir} {name} {key}"
        ta = json.loads((a / "trainer.json").read_text())
        tb = json.loads((b / "trainer.json").read_text())
        assert ta["trainer"]["global_step"] == tb["trainer"]["global_step"]
        assert ta["loader"] == tb["loader"], "the loader state must not depend on the world size"


def test_chunked_loss_under_fsdp2_matches_single_process(ws: Workspace):
    """`loss_chunk_tokens` on 2 FSDP2 ranks: the head's gradient, computed outside the module's forward from the
    gathered weight, is reduce-scattered like any other (train and held-out rows as one process without chunking)."""
    run_dir = ws.root / "fsdp2-chunked"
    proc = ws.run(run_dir, "fsdp2", "loss_chunk_tokens=100")
    assert proc.returncode == 0, _explain(proc)
    single = ws.full("none")
    _assert_rows_close(_rows(single, "train"), _rows(run_dir, "train"), "fsdp2 chunked train")
    _assert_rows_close(_rows(single, "val"), _rows(run_dir, "val"), "fsdp2 chunked val")
    _assert_weights_close(single / "stages" / "s2" / "hf" / "model.safetensors",
                          run_dir / "stages" / "s2" / "hf" / "model.safetensors")


# --------------------------------------------------------------------------- 2. checkpoints move between world sizes


@pytest.mark.parametrize(
    ("trained_with", "resumed_with", "stage", "step"),
    [
        ("fsdp2", "none", "s2", 8),  # 2 ranks -> 1 process, killed in the second stage
        ("none", "ddp", "s1", 4),  # 1 process -> 2 ranks, killed in the first stage (the resume crosses a stage)
    ],
)
def test_resume_on_a_different_world_size(ws: Workspace, tmp_path: Path, trained_with: str, resumed_with: str,
                                          stage: str, step: int):
    original = ws.full(trained_with)
    before = _rows(original)
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    _simulate_crash(run_dir, stage, step)

    proc = ws.run(run_dir, resumed_with)
    assert proc.returncode == 0, _explain(proc)
    assert f"resumed stage '{stage}' from step {step}" in proc.stdout, _explain(proc)

    rows = _rows(run_dir)
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1)), "duplicate or missing train steps"
    resumes = [r for r in rows if r["event"] == "resume"]
    assert [(r["step"], r["stage"]) for r in resumes] == [(step, stage)]
    assert resumes[0]["superseded_rows"] > 0
    # Rows up to the checkpoint are the original ones, untouched (nothing before the resume point was retrained).
    kept = [r for r in before if r["step"] <= step]
    assert rows[: len(kept)] == kept
    assert all(r["time"] > kept[-1]["time"] for r in rows[len(kept):])
    stage_starts = [r["stage"] for r in rows if r["event"] == "stage_start"]
    assert sorted(stage_starts) == sorted(STAGES) and len(set(stage_starts)) == len(stage_starts)

    # What follows the resume point is what the uninterrupted runs computed.
    _assert_rows_close(_rows(original, "train"), train, f"{trained_with}->{resumed_with} vs uninterrupted")
    reference = ws.full("none")
    _assert_rows_close(_rows(reference, "train"), train, f"{trained_with}->{resumed_with} vs single process")
    for s in STAGES:
        assert (run_dir / "eval" / f"{s}.json").is_file()
        _assert_weights_close(reference / "stages" / s / "hf" / "model.safetensors",
                              run_dir / "stages" / s / "hf" / "model.safetensors")


# --------------------------------------------------------------------------- 3. clear errors at launch


def _assert_clean_failure(ws: Workspace, run_dir: Path, proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, _explain(proc)
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} missing from the error\n{_explain(proc)}"
    # torchrun itself reports a failed worker with its own traceback (ChildFailedError); midtrain's processes must
    # not: no frame of midtrain's code anywhere, and no traceback at all in any rank's stderr.
    assert str(Path(midtrain.__file__).parent) not in proc.stderr, _explain(proc)
    rank_err = _rank_logs(ws.log_dir(run_dir), "stderr.log")
    assert len(rank_err) == 2
    for log in rank_err:
        text = log.read_text()
        assert "Traceback" not in text and "error:" in text, f"{log}:\n{text}"


def test_batch_not_divisible_by_world_size_is_a_clear_error(ws: Workspace, tmp_path: Path):
    run_dir = tmp_path / "run"
    # 192 tokens = 3 sequences of 64 per step: cannot split over 2 ranks.
    proc = ws.run(run_dir, "ddp", f"stages.s1.batch.tokens={3 * SEQ_LEN}", "stages.s1.batch.micro=null")
    _assert_clean_failure(ws, run_dir, proc, "3 sequences per step", "over 2 ranks", "'s1'")
    assert not (run_dir / "checkpoints").exists() and not _rows(run_dir, "train")


def test_later_stage_batch_split_is_checked_at_launch(ws: Workspace, tmp_path: Path):
    run_dir = tmp_path / "run"
    # s1 cut to one step: the test is about when s2's batch is checked, not about training s1.
    proc = ws.run(run_dir, "ddp", "stages.s1.tokens=512", f"stages.s2.batch.tokens={3 * SEQ_LEN}",
                  "stages.s2.batch.micro=null")
    _assert_clean_failure(ws, run_dir, proc, "3 sequences per step", "over 2 ranks", "'s2'")
    assert not _rows(run_dir, "train"), "stage s1 trained before the launch-time error"
