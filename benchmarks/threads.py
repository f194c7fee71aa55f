"""Oversubscribed vs chosen torch threads on a busy machine: the setting `midtrain run --threads auto` picks.

Other work is simulated by busy-looping processes (one per core but one, bounded in time); a tiny-llama training step
is timed interleaved with torch threads = all cores (torch's default: oversubscribed) and with the count
`midtrain.threads.choose_threads` gives for that load (the 1-minute load average it reads settles at the number of
busy processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.common import BenchResult, interleaved, register

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def _step(threads: int):
    import torch

    from midtrain.model import build_model, preset_config

    model = build_model(preset_config("tiny-llama", vocab_size=4096), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (8, 256), generator=torch.Generator().manual_seed(0))

    def run() -> None:
        torch.set_num_threads(threads)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


@register("threads", "oversubscribed vs auto-chosen torch threads under background load")
def bench(quick: bool = False, repeats: int | None = None, log=print) -> BenchResult:
    import torch

    from midtrain.threads import choose_threads

    cores = os.cpu_count() or 1
    busy = max(1, cores - 1)
    chosen = choose_threads("auto", cores=cores, load=float(busy), env={}).threads
    previous = torch.get_num_threads()
    repeats = repeats or (4 if quick else 10)
    procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=30 + 20 * repeats)]) for _ in range(busy)]
    try:
        time.sleep(1.0)
        timing = interleaved({f"{cores} threads (oversubscribed)": _step(cores), f"{chosen} (auto)": _step(chosen)},
                             warmup=1, repeats=repeats, log=log)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        torch.set_num_threads(previous)
    rows = [{"threads": name, "busy processes": busy, "median step s": round(t.median, 3)}
            for name, t in timing.items()]
    over, auto = (t.median for t in timing.values())
    return BenchResult("threads", ["threads", "busy processes", "median step s"], rows,
                       [{"speed-up of auto over oversubscribed": round(over / auto, 2)}],
                       notes=[f"{busy} busy-looping process(es) on {cores} cores; auto chose {chosen}"])
