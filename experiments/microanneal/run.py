"""Annealing on a target domain vs a control anneal (Llama 3's data valuation, OLMo 2's microanneals), and vs
constant-LR continued training on the same data: anneal the base with the LR decaying linearly to 0 on 30% candidate
data + 70% of the base mixture, against (a) the same anneal on the base mixture alone (the difference values the
candidate) and (b) the same data and tokens at the base's final LR held constant (the difference is what the anneal
itself adds: Llama 3 §3.1.3 / OLMo 2's claim that annealing on a domain beats continued training on it).

    python experiments/microanneal/run.py [--seeds 3]

From the shared base (prose + code, cosine to 3e-4; experiments/base.yaml), 200k tokens, LR 3e-4 -> 0 linearly (or
constant 3e-4), no warm-up, same seeds (data orders) in every arm. Metrics: held-out loss per domain and `arith`
(100 offline word problems, exact match of the first integer of the greedy answer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import Stopwatch, continual, fmt, shared_base, table  # noqa: E402

HERE = Path(__file__).resolve().parent
ANNEAL = {"kind": "linear", "peak_lr": 3e-4, "min_lr": 0.0, "warmup_tokens": 0}
CONSTANT = {"kind": "constant", "peak_lr": 3e-4, "warmup_tokens": 0}  # the base's final LR, held
BASE_MIX = {"prose": 0.6, "code": 0.4}
WITH_MATH = {"math": 0.3, "prose": 0.42, "code": 0.28}
# arm -> (run-dir slug, mixture, schedule, base): from the cosine-annealed shared base (at 3e-4 when it ended)
ARMS = {"control (base mix)": ("microanneal-control", BASE_MIX, ANNEAL, "base"),
        "candidate: 30% math": ("microanneal-math", WITH_MATH, ANNEAL, "base"),
        "constant LR, 30% math": ("microanneal-math-constant", WITH_MATH, CONSTANT, "base")}
# ... and from a WSD stable-phase base (the same run at a constant 3e-3: the checkpoint Llama 3 and OLMo 2 anneal),
# where continued training keeps the stable LR and the anneal decays it to 0.
STABLE_BASE = {"kind": "constant", "peak_lr": 3e-3, "warmup_tokens": 40_000}
STABLE_ARMS = {"stable base: anneal 3e-3 → 0, 30% math":
               ("microanneal-stable-anneal", WITH_MATH, {**ANNEAL, "peak_lr": 3e-3}, "base-stable"),
               "stable base: constant 3e-3, 30% math":
               ("microanneal-stable-constant", WITH_MATH, {**CONSTANT, "peak_lr": 3e-3}, "base-stable")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    clock = Stopwatch()
    runs: dict[str, list[dict]] = {}
    befores: dict[str, dict] = {}
    for arm, (slug, mix, schedule, base_name) in {**ARMS, **STABLE_ARMS}.items():
        base_dir = shared_base(base_name, STABLE_BASE if base_name == "base-stable" else None)
        for seed in range(args.seeds):
            evals = continual(slug, mix, seed, schedule=schedule, tokens="200k", base=base_dir)
            runs.setdefault(arm, []).append(evals["cont"])
            befores[base_name] = evals["cont-before"]
            print(f"{arm} seed {seed}: math {evals['cont']['loss.math']:.4f} arith {evals['cont']['arith']:.2f}"
                  f"  ({clock.minutes():.1f} min)", flush=True)
    keys = ["loss.math", "loss.general", "loss.code", "arith"]
    def delta(label: str, a: str, b: str) -> list[str]:
        return [label, *(fmt([x[k] - y[k] for x, y in zip(runs[a], runs[b])]) for k in keys)]

    rows = [["base (before)", *(f"{befores['base'][k]:.4f}" for k in keys)]]
    rows += [[arm, *(fmt([r[k] for r in rs]) for k in keys)] for arm, rs in runs.items() if arm in ARMS]
    control, cand, constant = ARMS
    rows += [delta("Δ candidate − control", cand, control), delta("Δ anneal − constant LR (same data)", cand, constant)]
    rows.append(["stable-phase base (before)", *(f"{befores['base-stable'][k]:.4f}" for k in keys)])
    rows += [[arm, *(fmt([r[k] for r in rs]) for k in keys)] for arm, rs in runs.items() if arm in STABLE_ARMS]
    rows.append(delta("Δ anneal − constant LR, stable base", *STABLE_ARMS))
    md = (f"Mean ± std over {args.seeds} seeds (data orders; the Δ rows pair equal seeds); "
          f"{clock.minutes():.0f} min on this machine.\n\n"
          + table(["anneal", "math loss", "general loss", "code loss", "arith accuracy"], rows) + "\n")
    (HERE / "results.json").write_text(json.dumps({"before": befores, "runs": runs}, indent=1))
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
