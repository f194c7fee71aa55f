"""Annealing on a target domain vs a control anneal (Llama 3's data valuation, OLMo 2's microanneals): anneal the
base with the LR decaying linearly to 0 on 30% candidate data + 70% of the base mixture, against the same anneal on
the base mixture alone; the difference in target metrics values the candidate.

    python experiments/microanneal/run.py [--seeds 3]

From the shared base (prose + code, cosine to 3e-4; experiments/base.yaml), 200k tokens, LR 3e-4 -> 0 linearly, no
warm-up, same seeds for both arms. Metrics: held-out loss per domain and `arith` (100 offline word problems, exact
match of the first integer of the greedy answer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import Stopwatch, continual, fmt, table  # noqa: E402

HERE = Path(__file__).resolve().parent
ANNEAL = {"kind": "linear", "peak_lr": 3e-4, "min_lr": 0.0, "warmup_tokens": 0}
ARMS = {"control (base mix)": {"prose": 0.6, "code": 0.4},
        "candidate: 30% math": {"math": 0.3, "prose": 0.42, "code": 0.28}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    clock = Stopwatch()
    runs: dict[str, list[dict]] = {}
    for arm, mix in ARMS.items():
        for seed in range(args.seeds):
            slug = "microanneal-" + ("control" if arm.startswith("control") else "math")
            evals = continual(slug, mix, seed, schedule=ANNEAL, tokens="200k")
            runs.setdefault(arm, []).append(evals["cont"])
            base = evals["cont-before"]
            print(f"{arm} seed {seed}: math {evals['cont']['loss.math']:.4f} arith {evals['cont']['arith']:.2f}"
                  f"  ({clock.minutes():.1f} min)", flush=True)
    keys = ["loss.math", "loss.general", "loss.code", "arith"]
    rows = [["base (before)", *(f"{base[k]:.4f}" for k in keys)]]
    rows += [[arm, *(fmt([r[k] for r in rs]) for k in keys)] for arm, rs in runs.items()]
    control, cand = runs.values()
    rows.append(["Δ candidate − control", *(fmt([c[k] - b[k] for c, b in zip(cand, control)]) for k in keys)])
    md = (f"Mean ± std over {args.seeds} seeds (data orders; the Δ row pairs equal seeds); "
          f"{clock.minutes():.0f} min on this machine.\n\n"
          + table(["anneal", "math loss", "general loss", "code loss", "arith accuracy"], rows) + "\n")
    (HERE / "results.json").write_text(json.dumps({"base": base, "runs": runs}, indent=1))
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
