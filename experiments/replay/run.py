"""Replay under a domain shift (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs"):
continued training on a new domain forgets the old one; re-warming and re-decaying the LR with 5% (weak shift) to
25% (strong shift) of replayed pre-training data limits the forgetting.

    python experiments/replay/run.py [--seeds 3]

From the shared base (prose + code, experiments/base.yaml), 300k tokens of continued training on synthetic math (a
strong shift) with LR re-warmed to 1e-3 and cosine-decayed to 1e-4, replaying 0%, 5% or 25% of the base mixture.
Forgetting = held-out general (prose) loss after minus before; gain = math loss before minus after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import Stopwatch, continual, fmt, table  # noqa: E402

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.0, 0.05, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    clock = Stopwatch()
    runs: dict[float, list[dict]] = {}
    for f in FRACTIONS:
        for seed in range(args.seeds):
            mix = {"math": 1 - f, "prose": 0.6 * f, "code": 0.4 * f}
            evals = continual(f"replay-{int(f * 100)}", mix, seed)
            before, after = evals["cont-before"], evals["cont"]
            runs.setdefault(f, []).append({"before": before, "after": after})
            print(f"replay {f:.0%} seed {seed}: general {before['loss.general']:.4f} -> {after['loss.general']:.4f}"
                  f"  math {before['loss.math']:.4f} -> {after['loss.math']:.4f}  ({clock.minutes():.1f} min)",
                  flush=True)
    rows = []
    for f, rs in runs.items():
        forget = [r["after"]["loss.general"] - r["before"]["loss.general"] for r in rs]
        rel = [100 * (r["after"]["loss.general"] / r["before"]["loss.general"] - 1) for r in rs]
        gain = [r["before"]["loss.math"] - r["after"]["loss.math"] for r in rs]
        code = [r["after"]["loss.code"] - r["before"]["loss.code"] for r in rs]
        rows.append([f"{f:.0%}", fmt([r["after"]["loss.general"] for r in rs]), fmt(forget), fmt(rel, 2) + " %",
                     fmt(code), fmt([r["after"]["loss.math"] for r in rs]), fmt(gain)])
    b = runs[FRACTIONS[0]][0]["before"]
    md = (f"Base before continued training: general {b['loss.general']:.4f}, code {b['loss.code']:.4f}, "
          f"math {b['loss.math']:.4f}. Mean ± std over {args.seeds} seeds (data orders); "
          f"{clock.minutes():.0f} min on this machine.\n\n"
          + table(["replay", "general loss after", "forgetting (Δ general)", "Δ general (rel.)", "Δ code",
                   "math loss after", "math gain"], rows) + "\n")
    (HERE / "results.json").write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=1))
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
