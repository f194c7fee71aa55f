"""Averaging at the end of an anneal: last iterate vs tail (Polyak) average vs EMA vs a 3-seed soup, plus the
gradient noise scale the anneal sees.

    python experiments/averaging/run.py [--seeds 3]

From the shared base (prose + code, experiments/base.yaml), 300k tokens of annealing on 70% synthetic math + 30% of
the base mixture with a WSD schedule (1e-3, last 30% decaying linearly to 0), micro-batches of 4 rows so the
noise scale is measured every 5 steps. Arms: the last iterate; `average: {kind: tail}` and `{kind: ema, decay: 0.9}`
over the decay; `seeds: [1..K]` souped (K× the compute). Held-out loss per domain of each stage export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import ROOT, WORK, Stopwatch, place_recipe, run_recipe, shared_base, table  # noqa: E402
from midtrain.layout import RunLayout  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEDULE = '{kind: wsd, peak_lr: 1e-3, decay_fraction: 0.3, decay_shape: linear, min_lr: 0}'
MIX = "{math: 0.7, prose: 0.18, code: 0.12}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    clock = Stopwatch()
    base = shared_base()
    recipe = place_recipe(ROOT / "experiments" / "continual.yaml")
    common = [f"base={base}", f"stages.cont.schedule={SCHEDULE}", f"stages.cont.data.mixture={MIX}",
              "stages.cont.batch.micro=4", "monitor.gns_every_steps=5", "log_every_steps=5"]
    soup = "[" + ", ".join(str(k) for k in range(1, args.seeds + 1)) + "]"
    arms = {"last iterate": [], "tail average (decay)": ["stages.cont.average={kind: tail}"],
            "EMA 0.9 (decay)": ["stages.cont.average={kind: ema, decay: 0.9}"],
            f"soup of {args.seeds} seeds": [f"stages.cont.seeds={soup}"]}
    results = {}
    for name, extra in arms.items():
        run_dir = WORK / "averaging" / name.split()[0].lower()
        evals = run_recipe(recipe, run_dir, common + extra)
        results[name] = {"before": evals["cont-before"], "after": evals["cont"], "run_dir": str(run_dir)}
        layout = RunLayout(run_dir)
        for seed in layout.branch_seeds("cont"):
            branch = layout.branch("cont", seed)
            results[name][branch.dir.name] = json.loads(branch.eval_after.read_text())["metrics"]
        raw = layout.stage("cont").eval_raw
        if raw.is_file():
            results[name]["raw"] = json.loads(raw.read_text())["metrics"]
        print(f"{name}: loss {evals['cont']['loss']:.4f}  ({clock.minutes():.1f} min)", flush=True)
    keys = ["loss", "loss.math", "loss.general", "loss.code", "arith"]
    rows = [["start (base)", *(f"{results['last iterate']['before'].get(k, float('nan')):.4f}" for k in keys)]]
    for name, r in results.items():
        rows.append([name, *(f"{r['after'].get(k, float('nan')):.4f}" for k in keys)])
        for part in sorted(k for k in r if k.startswith("seed-")):
            rows.append([f"  branch {part}", *(f"{r[part].get(k, float('nan')):.4f}" for k in keys)])
    gns_rows = [json.loads(line) for line in RunLayout(results["last iterate"]["run_dir"]).metrics
                .read_text().splitlines()]
    gns = [(r["stage_tokens"], r["gns"], r["lr"]) for r in gns_rows if r.get("event") == "train" and "gns" in r]
    picks = [gns[0], gns[len(gns) // 2], gns[-1]] if gns else []
    md = (f"Held-out loss of each arm's stage export after 300k anneal tokens (one data order per arm, seed 0; "
          f"branches use seeds 1..{args.seeds}); {clock.minutes():.0f} min on this machine.\n\n"
          + table(["arm", *keys], rows) + "\n\n"
          + "Gradient noise scale in the last-iterate run (EMA 0.95 of the estimates, batch 4096 tokens, "
            "micro-batch 1024):\n\n"
          + table(["anneal tokens", "B_simple (tokens)", "lr"], [[f"{t:,}", f"{g:,.0f}", f"{lr:.1e}"]
                                                                  for t, g, lr in picks]) + "\n")
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
