"""WSD vs cosine, and a 1-sqrt vs a linear cooldown, at a budget where the model converges (Hägele et al. 2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"; MiniCPM). Claims: WSD with a ~20%
cooldown matches cosine at equal tokens; 1-sqrt beats linear; WSD's best peak LR is about half of cosine's.

    python experiments/schedules/run.py [--seeds 3] [--budgets 1M,2M,4M,8M] [--lrs 1.5e-3,3e-3,6e-3,1.2e-2]

1. Budget: cosine runs (seed 0, peak 3e-3) at doubling budgets until the last 20% of the run gains under 2% of its
   total loss drop (training loss at the first logged step, and at 80% and at the end smoothed over 5% of the steps)
   and the held-out loss is within 2% of the half budget's: the first budget where the model has converged in that
   sense (the loss curve is flat, not only the schedule's tail) is the budget B of everything below.
2. LR sweep at B (seed 0): cosine and WSD (20% linear cooldown) at each peak LR; each family's best LR by held-out
   loss is the one its arms use.
3. Arms at B, seeds 0..2: cosine; WSD 10% and 20% linear, 20% 1-sqrt. Held-out loss per domain; differences paired
   by seed (same init and data order); for WSD the cooldown's own drop in training loss.

A ~0.4M-parameter Llama (tiny-llama at hidden 64: a config the script writes; init from scratch) on real prose + code
(the demo's corpus, BPE vocab 2048) in its natural proportions, seq 256, 4096 tokens per step, 40k warm-up tokens,
every schedule decaying to 0. Two runs at a time, one thread each. Writes results.json and results.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import WORK, Stopwatch, corpus_dir, fmt, place_recipe, run_recipe, table  # noqa: E402

HERE = Path(__file__).resolve().parent
ARMS = {
    "cosine": {"kind": "cosine"},
    "wsd 10% linear": {"kind": "wsd", "decay_fraction": 0.1, "decay_shape": "linear"},
    "wsd 20% linear": {"kind": "wsd", "decay_fraction": 0.2, "decay_shape": "linear"},
    "wsd 20% 1-sqrt": {"kind": "wsd", "decay_fraction": 0.2, "decay_shape": "1-sqrt"},
}
SWEPT = {"cosine": "cosine", "wsd 20% linear": "wsd"}  # arm -> LR family whose best LR it uses
CONVERGED = 0.02  # the last 20% gains under 2% of the run's total drop
FLAT = 0.02  # ... and twice the tokens gain under 2% of the held-out loss


def micro_base() -> Path:
    """config.json of tiny-llama at hidden 64 (2 heads of 32): a `base:` dir with no weights, for `init: scratch`."""
    from midtrain.model import preset_config

    out = corpus_dir() / "micro-llama"
    if not (out / "config.json").is_file():
        preset_config("tiny-llama", vocab_size=2048, hidden_size=64, intermediate_size=256,
                      head_dim=32).save_pretrained(str(out))
    return out


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["stage_tokens"], r["loss"]) for r in rows if r.get("event") == "train"]


def smoothed(curve: list[tuple[int, float]], at: float, width: float = 0.05) -> float:
    """Mean training loss over the logged steps in a window of `width` of the run centred on fraction `at` (moved
    inside the run at its ends)."""
    total = curve[-1][0]
    lo = min(max(at - width / 2, 0.0), 1.0 - width) * total
    values = [loss for tokens, loss in curve if lo <= tokens <= lo + width * total]
    return sum(values) / len(values)


def convergence(run_dir: Path) -> dict[str, float]:
    curve = train_losses(run_dir)
    start, at80, end = curve[0][1], smoothed(curve, 0.8), smoothed(curve, 1.0)  # start: the first logged step
    return {"start": start, "at_80pct": at80, "end": end, "last20_share": (at80 - end) / (start - end)}


def one_run(args: tuple[str, dict, str, int, float]) -> dict:
    """(name, schedule, budget, seed, peak_lr) -> held-out metrics, convergence stats and the run dir."""
    name, schedule, budget, seed, lr = args
    slug = name.replace(" ", "_").replace("%", "")
    run_dir = WORK / "schedules-converge" / f"{slug}-lr{lr:g}-seed{seed}-{budget}"
    overrides = [f"base={micro_base()}", f"seed={seed}", f"stages.train.tokens={budget}",
                 f"stages.train.schedule.peak_lr={lr}",
                 *(f"stages.train.schedule.{k}={v}" for k, v in schedule.items())]
    evals = run_recipe(place_recipe(HERE / "recipe.yaml"), run_dir, overrides)
    return {"metrics": evals["train"], "curve": convergence(run_dir), "dir": str(run_dir)}


def run_all(jobs: list[tuple], workers: int, clock: Stopwatch) -> list[dict]:
    if workers == 1:
        results = [one_run(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(one_run, jobs))
    for job, r in zip(jobs, results):
        print(f"{job[0]} lr {job[4]:g} seed {job[3]} @{job[2]}: loss {r['metrics']['loss']:.4f}, last 20% "
              f"{r['curve']['last20_share']:.1%} of the drop ({clock.minutes():.1f} min)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default="1M,2M,4M,8M", help="cosine budgets tried in order (phase 1)")
    parser.add_argument("--lrs", default="1.5e-3,3e-3,6e-3,1.2e-2", help="peak LRs of the sweep (phase 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", help="run phases 2-3 at this budget instead of phase 1's pick (one of --budgets)")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    parser.add_argument("--probe-only", action="store_true", help="phase 1 only: print the budget's convergence")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((HERE / "results.json").read_text())
        (HERE / "results.md").write_text(report(saved))
        print(report(saved))
        return
    clock = Stopwatch()
    corpus_dir()
    probes = []
    for budget in args.budgets.split(","):  # phase 1: the budget
        [probe] = run_all([("cosine", ARMS["cosine"], budget, 0, 3e-3)], 1, clock)
        loss = probe["metrics"]["loss"]
        gain = (probes[-1]["loss"] - loss) / probes[-1]["loss"] if probes else None
        probes.append({"budget": budget, **probe["curve"], "loss": loss, "gain_vs_half": gain})
        if probe["curve"]["last20_share"] < CONVERGED and gain is not None and gain < FLAT:
            break
    budget = args.budget or probes[-1]["budget"]
    if args.probe_only:
        print(json.dumps(probes, indent=1))
        return
    lrs = [float(x) for x in args.lrs.split(",")]  # phase 2: the LR sweep
    sweep_jobs = [(arm, ARMS[arm], budget, 0, lr) for arm in SWEPT for lr in lrs]
    sweep = run_all(sweep_jobs, args.workers, clock)
    best_lr = {}
    for arm in SWEPT:
        scored = [(r["metrics"]["loss"], job[4]) for job, r in zip(sweep_jobs, sweep) if job[0] == arm]
        best_lr[SWEPT[arm]] = min(scored)[1]
    arm_jobs = [(arm, ARMS[arm], budget, seed, best_lr["cosine" if arm == "cosine" else "wsd"])
                for arm in ARMS for seed in range(args.seeds)]  # phase 3: the arms
    arms = run_all(arm_jobs, args.workers, clock)
    runs: dict[str, list[dict]] = {}
    for job, r in zip(arm_jobs, arms):
        runs.setdefault(job[0], []).append({"seed": job[3], "lr": job[4], **r})
    picked = next((p["budget"] for p in probes if p["last20_share"] < CONVERGED and p["gain_vs_half"] is not None
                   and p["gain_vs_half"] < FLAT), None)
    saved = {"budget": budget, "picked": picked, "probes": probes, "seeds": args.seeds, "converged_below": CONVERGED,
             "sweep": [{"arm": j[0], "lr": j[4], "loss": r["metrics"]["loss"]} for j, r in zip(sweep_jobs, sweep)],
             "best_lr": best_lr, "runs": runs, "minutes": clock.minutes()}
    (HERE / "results.json").write_text(json.dumps(saved, indent=1))
    (HERE / "results.md").write_text(report(saved))
    print(report(saved))


def cooldown_drop(run: dict, fraction: float) -> float:
    """Training loss just before the cooldown minus at the end (smoothed as in phase 1)."""
    curve = train_losses(Path(run["dir"]))
    return smoothed(curve, 1 - fraction - 0.025) - smoothed(curve, 1.0)


def report(saved: dict) -> str:
    probe_rows = [[p["budget"], f"{p['start']:.3f}", f"{p['at_80pct']:.3f}", f"{p['end']:.3f}",
                   f"{p['last20_share']:.1%}", f"{p['loss']:.4f}",
                   "—" if p["gain_vs_half"] is None else f"{p['gain_vs_half']:.1%}"] for p in saved["probes"]]
    lrs = sorted({s["lr"] for s in saved["sweep"]})
    sweep_rows = [[arm, *(f"{next(s['loss'] for s in saved['sweep'] if s['arm'] == arm and s['lr'] == lr):.4f}"
                          for lr in lrs)] for arm in dict.fromkeys(s["arm"] for s in saved["sweep"])]
    runs = saved["runs"]
    cosine = [r["metrics"]["loss"] for r in runs["cosine"]]
    arm_rows = []
    for name, rs in runs.items():
        loss = [r["metrics"]["loss"] for r in rs]
        fraction = ARMS[name].get("decay_fraction")
        arm_rows.append([name, f"{rs[0]['lr']:g}", fmt(loss), fmt([r["metrics"]["loss.general"] for r in rs]),
                         fmt([r["metrics"]["loss.code"] for r in rs]),
                         fmt([a - b for a, b in zip(loss, cosine)]) if name != "cosine" else "—",
                         fmt([cooldown_drop(r, fraction) for r in rs]) if fraction else "—"])
    linear = [r["metrics"]["loss"] for r in runs["wsd 20% linear"]]
    sqrt = [r["metrics"]["loss"] for r in runs["wsd 20% 1-sqrt"]]
    return (f"**Budget.** Cosine at peak 3e-3, seed 0, at doubling budgets until the last 20% of the run gains under "
            f"{saved['converged_below']:.0%} of its total drop (training loss, smoothed over 5% of the steps) and the "
            f"held-out loss is within {FLAT:.0%} of the half budget's:\n\n"
            + table(["budget", "loss at start", "at 80%", "at end", "last 20% / total drop", "held-out loss",
                     "gain vs half the budget"], probe_rows)
            + ("" if saved.get("picked") else
               f"\n\nNo budget up to {saved['probes'][-1]['budget']} met both conditions; the runs below are at "
               f"{saved['budget']}: what this machine's time allowed for the sweep and the arms.")
            + f"\n\n**LR sweep** at {saved['budget']} (seed 0, held-out loss); best: cosine "
            f"{saved['best_lr']['cosine']:g}, WSD {saved['best_lr']['wsd']:g}.\n\n"
            + table(["schedule", *(f"peak {lr:g}" for lr in lrs)], sweep_rows)
            + f"\n\n**Arms** at {saved['budget']} tokens, each family at its best LR, mean ± std over {saved['seeds']} "
            f"seeds; Δ is paired by seed. 1-sqrt − linear (20% cooldown, paired): "
            f"{fmt([a - b for a, b in zip(sqrt, linear)])}. The sweep and the arms: {saved['minutes']:.0f} min on this "
            "machine, two runs at a time.\n\n"
            + table(["schedule", "peak LR", "held-out loss", "loss (prose)", "loss (code)", "Δ vs cosine (paired)",
                     "cooldown's drop (train loss)"], arm_rows) + "\n")


if __name__ == "__main__":
    main()
