"""Crash-consistency scenarios shared by tests/reliability and experiments/reliability.py.

Each scenario runs the midtrain CLI in child processes on the tiny two-stage recipe (tests/train/tiny.py), injects
one fault through `MIDTRAIN_FAULT` (midtrain.faults), checks the state the crash left, resumes, and returns its
observations as a flat dict (figures, not verdicts): the tests assert on them, the experiment tabulates them.

Children are forked from a fork server that has imported torch, transformers and midtrain once (multiprocessing's
`forkserver`): a child is a separate process with its own pid, files and exit status — it dies by SIGKILL like any
other — but starts in milliseconds instead of the ~6 s of imports a fresh `python -m midtrain` pays. The reference
run is a real `python -m midtrain run` (`exec_=True`), so every comparison also checks that the two agree bit for
bit. `MIDTRAIN_RELIABILITY_EXEC=1` makes every launch a fresh interpreter.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from midtrain.faults import ENV, MARKER_ENV, SEED_ENV, read_marker

from ..train.tiny import write_recipe

# 8 warm + 4 anneal steps of 512 tokens, a checkpoint every 2 steps: warm 2, 4, 6, 8 and anneal 10, 12.
SIZES = dict(warm_tokens=8 * 512, anneal_tokens=4 * 512, every=2 * 512)
STEPS = 12
CHECKPOINTS = (2, 4, 6, 8, 10, 12)
RESUMED = re.compile(r"resumed stage '([^']+)' from step (\d+)")


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    marker: list = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def resumed(self) -> tuple[str, int] | None:
        m = RESUMED.search(self.stdout)
        return (m.group(1), int(m.group(2))) if m else None


def launch(*args: str, cache: Path, fault: str | None = None, marker: Path | None = None, seed: int = 0,
           fsize_limit: int | None = None, timeout: float = 300, exec_: bool = False) -> Launch:
    """`midtrain ARGS` in a child process with one thread; `fault` arms MIDTRAIN_FAULT; `fsize_limit` sets
    RLIMIT_FSIZE (a write past it fails with EFBIG); `exec_` runs a fresh `python -m midtrain`."""
    env = {**os.environ, "MIDTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", SEED_ENV: str(seed)}
    env.pop(ENV, None)
    env.pop(MARKER_ENV, None)
    if fault:
        env[ENV] = fault
    if marker is not None:
        env[MARKER_ENV] = str(marker)
    if exec_ or os.environ.get("MIDTRAIN_RELIABILITY_EXEC") == "1":
        proc = subprocess.run([sys.executable, "-m", "midtrain", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, preexec_fn=(lambda: _limit(fsize_limit)) if fsize_limit else None)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = _forked(list(args), env, fsize_limit, timeout)
    return Launch(code, out, err, read_marker(marker) if marker else [])


def _limit(fsize_limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))


_PRELOAD = ["torch", "transformers", "midtrain.cli", "midtrain.run.driver", "midtrain.data.prepare"]
_context = None


def _forked(argv: list[str], env: dict, fsize_limit: int | None, timeout: float) -> tuple[int, str, str]:
    global _context
    if _context is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # the fork server's torch reads it at import
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _context.Process(target=_child, args=(argv, env, str(out), str(err), fsize_limit))
        proc.start()
        proc.join(timeout)
        timed_out = proc.exitcode is None
        try:  # the child's session: what it left behind when killed (datatrove's Manager server) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.join()
        if timed_out:
            raise TimeoutError(f"midtrain {' '.join(argv)} ran past {timeout}s")
        return (proc.exitcode, *(p.read_text(errors="replace") if p.exists() else "" for p in (out, err)))


def _child(argv: list[str], env: dict, out: str, err: str, fsize_limit: int | None) -> None:
    """Runs the CLI as `python -m midtrain ARGV` would, in a forked child; exits with its status."""
    os.setsid()  # its own session, so the parent can end everything it started
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(env)
    if fsize_limit:
        _limit(fsize_limit)
    import torch

    from midtrain import faults
    from midtrain.cli import main

    torch.set_num_threads(1)
    faults.configure(env.get(ENV), int(env.get(SEED_ENV, "0")))
    sys.argv = ["midtrain", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to `python -m midtrain`
        traceback.print_exc()
        code = 1
    # What interpreter exit does for `python -m midtrain`: atexit handlers, among them `multiprocess`'s, which shut
    # down the Manager server datatrove's LocalPipelineExecutor forks (skipped, it outlives the test as an orphan).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class Reference:
    """One uninterrupted run every scenario compares against."""

    root: Path
    recipe: Path
    cache: Path
    run_dir: Path
    rows: list[dict]

    def run(self, run_dir: Path, *extra: str, cache: Path | None = None, **kw) -> Launch:
        return launch("run", str(self.recipe), "--set", f"run_dir={run_dir}", *extra, cache=cache or self.cache,
                      **kw)


def make_reference(root: Path) -> Reference:
    root.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(root, **SIZES)
    ref = Reference(root, recipe, root / "cache", root / "reference", [])
    result = ref.run(ref.run_dir, exec_=True)
    if result.returncode:
        raise RuntimeError(f"reference run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    ref.rows = train_rows(ref.run_dir)
    return ref


def compare(ref: Reference, run_dir: Path) -> dict:
    """Per-step losses (and lr, grad norm) of a finished run against the reference."""
    rows = train_rows(run_dir)
    same_steps = [r["step"] for r in rows] == [r["step"] for r in ref.rows]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref.rows)] if same_steps else [float("inf")]
    return {
        "steps_equal": same_steps,
        "losses_equal": same_steps and [r["loss"] for r in rows] == [r["loss"] for r in ref.rows],
        "lr_gradnorm_equal": same_steps and all(a["lr"] == b["lr"] and a["grad_norm"] == b["grad_norm"]
                                                for a, b in zip(rows, ref.rows)),
        "max_abs_diff": max(diffs, default=0.0),
    }


def complete_checkpoints(run_dir: Path) -> dict[str, list[int]]:
    out = {}
    for stage_dir in sorted((run_dir / "checkpoints").glob("*")):
        out[stage_dir.name] = sorted(int(p.parent.name.removeprefix("step-"))
                                     for p in stage_dir.glob("step-*/manifest.json")
                                     if p.parent.name.removeprefix("step-").isdigit())
    return out


def temp_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint and export temp dirs (what a kill mid-write leaves)."""
    return sorted([*run_dir.glob("checkpoints/*/step-*.tmp-*"), *run_dir.glob("stages/*/hf.tmp-*")])


def _reached(result: Launch, point: str) -> bool:
    return any(name == point for name, *_ in result.marker)


# --------------------------------------------------------------------------- scenarios


def crash_in_training(ref: Reference, work: Path, point: str, occurrence: int) -> dict:
    """Kill at `train.mid_step` or `ckpt.mid_write`; resume; a partial checkpoint must never be the one loaded."""
    run_dir, marker = work / "run", work / "marker"
    crash = ref.run(run_dir, fault=f"{point}:{occurrence}", marker=marker)
    before = complete_checkpoints(run_dir)
    partial = [p for p in temp_dirs(run_dir) if not (p / "manifest.json").exists()]
    partial_steps = {int(p.name.split(".tmp-")[0].removeprefix("step-")) for p in partial if "step-" in p.name}
    resume = ref.run(run_dir)
    resumed = resume.resumed()
    obs = {
        "reached": _reached(crash, point), "killed": crash.killed, "resume_rc": resume.returncode,
        "partial_dirs": len(partial), "resumed_from": resumed[1] if resumed else None,
        "partial_loaded": int(bool(resumed) and resumed[1] in partial_steps),
        "newest_complete_used": int(not resumed or resumed[1] == max(before.get(resumed[0], [0]))),
        "temps_left": len(temp_dirs(run_dir)), "stderr": resume.stderr[-2000:],
    }
    return {**obs, **(compare(ref, run_dir) if resume.returncode == 0 else {"losses_equal": False})}


def _export_files(export: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(export.iterdir()) if p.suffix == ".safetensors"}


def crash_in_export(ref: Reference, work: Path, occurrence: int) -> dict:
    """Kill while a stage's HF export sits in its temp dir: the export is absent, then complete and equal."""
    run_dir, marker = work / "run", work / "marker"
    crash = ref.run(run_dir, fault=f"export.mid_write:{occurrence}", marker=marker)
    stage = ("warm", "anneal")[occurrence - 1]
    export = run_dir / "stages" / stage / "hf"
    after_crash = {"export_absent": int(not export.exists()),
                   "export_temp": len(list(export.parent.glob("hf.tmp-*"))) if export.parent.exists() else 0}
    resume = ref.run(run_dir)
    equal = all(_export_files(run_dir / "stages" / s / "hf") == _export_files(ref.run_dir / "stages" / s / "hf")
                for s in ("warm", "anneal")) if resume.returncode == 0 else False
    return {"reached": _reached(crash, "export.mid_write"), "killed": crash.killed, **after_crash,
            "resume_rc": resume.returncode, "resumed_from": (resume.resumed() or (None, None))[1],
            "exports_equal": int(equal), "temps_left": len(temp_dirs(run_dir)), "stderr": resume.stderr[-2000:],
            **(compare(ref, run_dir) if resume.returncode == 0 else {"losses_equal": False})}


def _cache_dirs(cache: Path) -> tuple[dict[str, Path], list[Path]]:
    """Complete token-cache dirs by fingerprint, and temp dirs (a kill mid-write)."""
    tok = cache / "tok"
    entries = sorted(tok.iterdir()) if tok.is_dir() else []
    complete = {p.name: p for p in entries if not p.name.startswith(".") and (p / "meta.json").is_file()}
    incomplete = [p for p in entries if p.name not in complete]
    return complete, incomplete


def crash_in_tokenize(ref: Reference, work: Path, occurrence: int) -> dict:
    """Kill while tokenizing source `occurrence` into a fresh cache: shards are complete or redone, never half."""
    run_dir, marker, cache = work / "run", work / "marker", work / "cache"
    crash = ref.run(run_dir, cache=cache, fault=f"tokenize.mid_write:{occurrence}", marker=marker)
    complete, incomplete = _cache_dirs(cache)
    temps_only = all(p.name.startswith(".") and not (p / "meta.json").exists() for p in incomplete)
    resume = ref.run(run_dir, cache=cache)
    complete_after, incomplete_after = _cache_dirs(cache)
    ref_complete, _ = _cache_dirs(ref.cache)
    equal = sorted(complete_after) == sorted(ref_complete) and all(
        (complete_after[fp] / f).read_bytes() == (ref_complete[fp] / f).read_bytes()
        for fp in complete_after for f in ("tokens.bin", "docs.npy", "holdout_tokens.bin"))
    return {"reached": _reached(crash, "tokenize.mid_write"), "killed": crash.killed,
            "complete_after_crash": len(complete), "partial_after_crash": len(incomplete),
            "partial_only_temp": int(temps_only), "resume_rc": resume.returncode,
            "shards_equal": int(equal), "temps_left": len(incomplete_after), "stderr": resume.stderr[-2000:],
            **(compare(ref, run_dir) if resume.returncode == 0 else {"losses_equal": False})}


def disk_full(ref: Reference, work: Path, occurrence: int, fsize_limit: int = 3_000_000) -> dict:
    """Injected ENOSPC at checkpoint `occurrence`, then a real RLIMIT_FSIZE failure, then a clean resume."""
    run_dir, marker = work / "run", work / "marker"
    full = ref.run(run_dir, fault=f"ckpt.mid_write:{occurrence}:enospc", marker=marker)
    step = CHECKPOINTS[occurrence - 1]
    stage = "warm" if step <= 8 else "anneal"
    kept = complete_checkpoints(run_dir)
    intact = all(_verifies(run_dir / "checkpoints" / s / f"step-{n}") for s, ns in kept.items() for n in ns)
    obs = {"reached": _reached(full, "ckpt.mid_write"), "enospc_rc": full.returncode,
           "enospc_message": int("disk full (ENOSPC)" in full.stderr and f"step-{step}.tmp-" in full.stderr
                                 and "Traceback" not in full.stderr),
           "enospc_previous_intact": int(intact and step not in kept.get(stage, [])),
           "enospc_temps_left": len(temp_dirs(run_dir))}
    limited = ref.run(run_dir, fsize_limit=fsize_limit)  # resumes, then the next checkpoint's optimizer.pt fails
    kept2 = complete_checkpoints(run_dir)
    obs.update({"efbig_rc": limited.returncode,
                "efbig_message": int("file size limit exceeded" in limited.stderr and ".tmp-" in limited.stderr
                                     and "Traceback" not in limited.stderr),
                "efbig_previous_intact": int(all(_verifies(run_dir / "checkpoints" / s / f"step-{n}")
                                                 for s, ns in kept2.items() for n in ns)),
                "efbig_temps_left": len(temp_dirs(run_dir))})
    resume = ref.run(run_dir)
    obs.update({"resume_rc": resume.returncode, "stderr": (full.stderr + limited.stderr + resume.stderr)[-3000:]})
    return {**obs, **(compare(ref, run_dir) if resume.returncode == 0 else {"losses_equal": False})}


def _verifies(path: Path) -> bool:
    from midtrain.train.checkpoint import CheckpointError, verify

    try:
        verify(path)
        return True
    except CheckpointError:
        return False


def corrupt_newest(ref: Reference, work: Path, kill_step: int) -> dict:
    """Kill mid-step, corrupt the newest checkpoint: an error naming the file, then --fallback-checkpoint resumes."""
    run_dir, marker = work / "run", work / "marker"
    crash = ref.run(run_dir, fault=f"train.mid_step:{kill_step}", marker=marker)
    stage, steps = next((s, ns) for s, ns in reversed(complete_checkpoints(run_dir).items()) if ns)
    bad = run_dir / "checkpoints" / stage / f"step-{steps[-1]}" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    bad.write_bytes(bytes(data))
    refused = ref.run(run_dir)
    fallback = ref.run(run_dir, "--fallback-checkpoint")
    resumed = fallback.resumed()
    return {"reached": _reached(crash, "train.mid_step"), "killed": crash.killed,
            "refused_rc": refused.returncode,
            "refusal_names_file": int(str(bad) in refused.stderr and "checksum mismatch" in refused.stderr),
            "refusal_mentions_flag": int("--fallback-checkpoint" in refused.stderr),
            "fallback_names_file": int(str(bad) in fallback.stdout),
            "resume_rc": fallback.returncode, "bad_step": steps[-1],
            "resumed_from": resumed[1] if resumed else None,
            "stderr": (refused.stderr + fallback.stderr)[-3000:],
            **(compare(ref, run_dir) if fallback.returncode == 0 else {"losses_equal": False})}


def nan_rollback(ref: Reference, work: Path, fault_step: int) -> dict:
    """NaN gradients at one step under `skip` and under `rollback`: both consume the batch; rollback's replay must
    give exactly the skip run's losses (the same batch skipped, everything else reproduced)."""
    fault = f"train.mid_step:{fault_step}:nan"
    skip = ref.run(work / "skip", fault=fault, marker=work / "marker-skip")
    roll = ref.run(work / "rollback", "--set", "step_guard.on_fault=rollback", fault=fault,
                   marker=work / "marker-rollback")
    if skip.returncode or roll.returncode:
        return {"resume_rc": skip.returncode or roll.returncode, "losses_equal": False,
                "stderr": (skip.stderr + roll.stderr)[-3000:]}
    s_rows, r_rows = train_rows(work / "skip"), train_rows(work / "rollback")
    stage = next(r["stage"] for r in ref.rows if r["step"] == fault_step)
    # a checkpoint of the same stage before the fault to go back to; else the update is skipped (logged)
    to_step = max((c for c in CHECKPOINTS if c < fault_step and (c > 8) == (fault_step > 8)), default=None)
    expected = "rollback" if to_step else "nonfinite"
    s_bad = [r for r in s_rows if r.get("skipped")]
    r_bad = [r for r in r_rows if r.get("skipped")]
    rollbacks = [e for e in events(work / "rollback") if e["event"] == "rollback"]
    before = [r["loss"] for r in s_rows if r["step"] < fault_step] == \
        [r["loss"] for r in ref.rows if r["step"] < fault_step]
    return {
        "reached": _reached(skip, "train.mid_step") and _reached(roll, "train.mid_step"), "resume_rc": 0,
        "skip_rows": [(r["step"], r["skipped"]) for r in s_bad], "rollback_rows": [(r["step"], r["skipped"])
                                                                                   for r in r_bad],
        "expected_rollback": (fault_step, to_step, "nonfinite"), "expected_skip_reason": expected,
        "rollbacks": [(e["fault_step"], e["to_step"], e["reason"]) for e in rollbacks],
        "docs_logged": int(bool(s_bad) and bool(s_bad[0].get("skipped_docs"))
                           and s_bad[0].get("skipped_docs") == (r_bad[0].get("skipped_docs") if r_bad else None)
                           and bool(rollbacks) and rollbacks[0]["skipped_docs"] == s_bad[0]["skipped_docs"]),
        "losses_before_equal_reference": int(before),
        "losses_equal": [r["loss"] for r in s_rows] == [r["loss"] for r in r_rows],
        "max_abs_diff": max((abs(a["loss"] - b["loss"]) for a, b in zip(s_rows, r_rows)), default=0.0),
        "tokens_consumed": r_rows[-1]["tokens"] if r_rows else 0, "planned_tokens": ref.rows[-1]["tokens"],
        "skipped_docs": s_bad[0].get("skipped_docs") if s_bad else None,
        "report_lists_skip": int(f"| {fault_step} | {stage} | rollback | nonfinite, back to step"
                                 in (work / "rollback" / "report.md").read_text()
                                 and f"| {fault_step} | {stage} | skipped | {expected} |"
                                 in (work / "rollback" / "report.md").read_text()),
    }


# --------------------------------------------------------------------------- curation

CURATION = """\
base: preset:tiny-llama
tokenizer: bytes
sources:
  - {name: web, path: web.jsonl}
curation: {filters: [gopher_repetition], exact_dedup: false, minhash: false}
stages:
  - {name: s, tokens: 1024, seq_len: 64, batch: {tokens: 256}, schedule: {kind: constant, peak_lr: 1e-3},
     data: {mixture: {web: 1.0}}}
"""


def write_curation_corpus(root: Path, n: int = 40) -> tuple[Path, list[str], str]:
    """Plain prose documents (all pass Gopher repetition) plus one repetitive junk document (removed)."""
    import random

    rng = random.Random(0)
    words = ("river stone light garden window morning paper quiet music table letter winter summer bridge "
             "forest candle mountain harbor").split()
    keep = [" ".join(rng.choice(words) + ("s" if rng.random() < 0.3 else "") for _ in range(60)) + "."
            for _ in range(n)]
    keep = [f"Document {i}: {t}" for i, t in enumerate(keep)]
    junk = "buy now " * 200
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "web.jsonl", "w") as fh:
        for t in [*keep[: n // 2], junk, *keep[n // 2 :]]:
            fh.write(json.dumps({"text": t}) + "\n")
    (root / "curate.yaml").write_text(CURATION + f"run_dir: {root / 'run'}\n")
    return root / "curate.yaml", keep, junk


def curated_texts(run_dir: Path) -> list[str]:
    import gzip

    out = run_dir / "data" / "curated" / "web" / "output"
    return [json.loads(line)["text"] for f in sorted(out.glob("*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode().splitlines()]


def crash_in_curation(work: Path, occurrence: int) -> dict:
    recipe, keep, junk = write_curation_corpus(work)
    run_dir, cache = work / "run", work / "cache"
    crash = launch("data", "curate", str(recipe), cache=cache, fault=f"curate.mid_write:{occurrence}",
                   marker=work / "marker")
    success = run_dir / "data" / "curated" / "web" / "_SUCCESS"
    obs = {"reached": _reached(crash, "curate.mid_write"), "killed": crash.killed,
           "success_after_crash": int(success.exists())}
    resume = launch("data", "curate", str(recipe), cache=cache)
    kept = curated_texts(run_dir) if resume.returncode == 0 else []
    obs.update({"resume_rc": resume.returncode, "success": int(success.exists()),
                "curated_equal": int(sorted(kept) == sorted(keep) and junk not in kept),
                "curated_docs": len(kept), "expected_docs": len(keep), "stderr": resume.stderr[-2000:]})
    return obs


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def disk_full_in_export(ref: Reference, work: Path, occurrence: int) -> dict:
    """ENOSPC injected while a stage's export is being written: a clear exit 1, no export or temp dir left, the
    stage's final checkpoint intact; the next run exports it and finishes equal to the reference."""
    run_dir, marker = work / "run", work / "marker"
    full = ref.run(run_dir, fault=f"export.mid_write:{occurrence}:enospc", marker=marker)
    stage = ("warm", "anneal")[occurrence - 1]
    obs = {"reached": _reached(full, "export.mid_write"), "rc": full.returncode,
           "message": int("disk full (ENOSPC)" in full.stderr and f"while exporting stage '{stage}'" in full.stderr),
           "traceback": int("Traceback" in full.stderr), "export_absent": int(not (run_dir / "stages" / stage / "hf")
                                                                            .exists()),
           "temps_after_failure": len(temp_dirs(run_dir)),
           "final_checkpoint_kept": int(bool(complete_checkpoints(run_dir).get(stage)))}
    resume = ref.run(run_dir)
    equal = resume.returncode == 0 and all(
        _export_files(run_dir / "stages" / s / "hf") == _export_files(ref.run_dir / "stages" / s / "hf")
        for s in ("warm", "anneal"))
    return {**obs, "resume_rc": resume.returncode, "exports_equal": int(equal), "stderr": full.stderr[-2000:],
            **(compare(ref, run_dir) if resume.returncode == 0 else {"losses_equal": False})}
