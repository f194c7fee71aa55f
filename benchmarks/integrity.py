"""What verifying exports costs: an HF export with and without the checksums midtrain records (midtrain_files.json), and
the verification a re-run makes before it skips a finished stage (`midtrain.model.verify.verify_export`).

Timed interleaved on the demo's base model (what `midtrain demo` exports twice) and on medium-llama; the overhead
per export is set against the demo's wall time to check the budget of issue 25 (< 5%).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from benchmarks.common import BenchResult, interleaved, register

DEMO_EXPORTS = 2  # anneal and extend
DEMO_QUICK_WALL_S = 90.0  # `midtrain demo --quick` on this machine (docs/DEMO.md); the full demo is ~4x longer


def _models(quick: bool):
    import torch  # noqa: F401

    from midtrain.demo import DEMO_BASE
    from midtrain.model import build_model, load_model, load_tokenizer, preset_config

    yield "demo base (1M)", load_model(DEMO_BASE), load_tokenizer(DEMO_BASE)
    if not quick:
        tok = load_tokenizer(DEMO_BASE)
        yield "medium-llama", build_model(preset_config("medium-llama", vocab_size=len(tok)), seed=0), tok


def _steps(model, tokenizer, work: Path) -> dict[str, Callable[[], None]]:
    from midtrain.model import save_hf_checkpoint
    from midtrain.model.verify import verify_export

    def export(checksums: bool) -> Callable[[], None]:
        def run() -> None:
            # the checksums' cost: the same export with its manifest step patched out
            with contextlib.nullcontext() if checksums else mock.patch("midtrain.model.hf.write_manifest"):
                save_hf_checkpoint(model, tokenizer, work / ("with" if checksums else "without"),
                                   extra={"stage": "bench"})

        return run

    export(True)()
    return {"export, no checksums": export(False), "export + checksums": export(True),
            "verify (re-run skip)": lambda: verify_export(work / "with")}


@register("integrity", "cost of recording and verifying export checksums")
def bench(quick: bool = False, repeats: int | None = None, log=print) -> BenchResult:
    from midtrain.model import count_parameters

    rows, summary = [], []
    for label, model, tokenizer in _models(quick):
        work = Path(tempfile.mkdtemp(prefix="midtrain-bench-integrity-"))
        try:
            timing = interleaved(_steps(model, tokenizer, work), warmup=1, repeats=repeats or (3 if quick else 7),
                                 log=log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        size_mb = count_parameters(model)["total"] * 4 / 2**20
        for name, t in timing.items():
            rows.append({"model": label, "what": name, "fp32 MB": round(size_mb, 1),
                         "median ms": round(1e3 * t.median, 1)})
        plain, checked = timing["export, no checksums"].median, timing["export + checksums"].median
        overhead = checked - plain + timing["verify (re-run skip)"].median
        row = {"model": label, "export ratio (checksums / none)": round(checked / plain, 3),
               "overhead per export ms": round(1e3 * overhead, 1)}
        if label.startswith("demo"):
            row["demo --quick wall share"] = f"{100 * DEMO_EXPORTS * overhead / DEMO_QUICK_WALL_S:.2f}% (target < 5%)"
        summary.append(row)
    return BenchResult("integrity", ["model", "what", "fp32 MB", "median ms"], rows, summary,
                       notes=["overhead = the extra time of an export with checksums + one verification of it"])
