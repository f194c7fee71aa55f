"""Shared plumbing for `python -m benchmarks`: the registry, interleaved timing, memory, machine facts, output.

Benchmarks here run on shared, noisy machines (2 CPU cores that other people also use). Every comparison is therefore
timed *interleaved*: one step of A, one of B, one of A, ... (the order flips every round), and the reported figure is
the median, so a burst of foreign load hits both sides alike instead of deciding the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where this run writes its JSON (`--out-dir`): a benchmark that reads another's result (data reads trainer's) looks
# here, so a run with its own --out-dir compares with its own numbers.
OUT_DIR = [RESULTS_DIR]


# --------------------------------------------------------------------------- registry


@dataclass
class BenchResult:
    """What a benchmark hands back: table rows, derived figures (ratios, targets) and free-form notes."""

    name: str
    columns: list[str]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)  # e.g. ratios against targets
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "machine": machine_info(),
            "rows": self.rows,
            "summary": self.summary,
            "notes": self.notes,
            **self.extra,
        }


BenchFn = Callable[..., BenchResult]
REGISTRY: dict[str, tuple[BenchFn, str]] = {}


def register(name: str, help: str = "") -> Callable[[BenchFn], BenchFn]:
    """`@register("trainer")` on a function `fn(quick: bool) -> BenchResult` adds it to `python -m benchmarks`."""

    def deco(fn: BenchFn) -> BenchFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = (fn, help)
        return fn

    return deco


# --------------------------------------------------------------------------- threads


def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads (default: `MIDTRAIN_BENCH_THREADS`, else 2 — the shared CI machine's cores)."""
    import torch

    n = n or int(os.environ.get("MIDTRAIN_BENCH_THREADS", "2"))
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux `clear_refs` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss()` (VmHWM), else since process start (getrusage)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)  # measured steps, wall seconds
    cpu_times: list[float] = field(default_factory=list)  # the same steps, this process's CPU seconds (all threads)
    warmup: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None  # process peak RSS during the first (warm-up) step, heap trimmed before it
    step_rss_mb: float | None = None  # that peak minus RSS when the step began: the step's own working memory

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds per step: less sensitive to other processes taking the cores than wall time."""
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")

    def spread(self) -> float:
        """(max - min) / median of the measured steps: how noisy this configuration was."""
        return (max(self.times) - min(self.times)) / self.median if self.times else float("nan")


def trim_heap() -> None:
    """Hand glibc's cached free memory back to the OS, so RSS at a step's start is what is really in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def interleaved(
    steps: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, Timing]:
    """Time every callable `warmup + repeats` times, alternating A, B, C, then C, B, A, ...; medians do the rest.

    Memory is measured on the (untimed) first warm-up step of each callable: the heap is trimmed first so one
    configuration's cached allocations do not hide the next one's. Timed steps run on an untouched allocator, as a
    real training loop would.
    """
    names = list(steps)
    out = {n: Timing() for n in names}
    can_reset = reset_peak_rss()
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            measure_mem = can_reset and r == 0
            if measure_mem:
                trim_heap()
                base = rss_mb()
                reset_peak_rss()
            c0, t0 = time.process_time(), time.perf_counter()
            steps[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            t = out[name]
            if measure_mem:
                t.peak_rss_mb = peak_rss_mb()
                t.step_rss_mb = t.peak_rss_mb - base if base is not None else None
            if r < warmup:
                t.warmup.append(dt)
                continue
            t.times.append(dt)
            t.cpu_times.append(dc)
            if log:
                log(f"  {name}: {dt:.3f} s (cpu {dc:.3f} s)")
    if not can_reset:  # whole-process peak only: attribute it to nobody in particular
        peak = peak_rss_mb()
        for t in out.values():
            t.peak_rss_mb = peak
    return out


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(ln for ln in text.splitlines() if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    return {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from midtrain.train.precision import resolve_precision

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_precision_cpu": resolve_precision("auto", torch.device("cpu")),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(list(columns)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_result(result: BenchResult, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path
