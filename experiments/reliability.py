"""Fault-injection trials for docs/RELIABILITY.md: `python experiments/reliability.py --trials 3`.

For every fault-injection point (midtrain.faults) and every training fault, runs `--trials` seeded trials of the
scenario in tests/reliability/harness.py — the occurrence at which the point fires is drawn from its range with the
trial's seed — and writes the observed figures as a table between the markers in docs/RELIABILITY.md (and as JSON
next to this script). One uninterrupted reference run is shared by all trials.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability import harness  # noqa: E402

BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


def _n(rows: list[dict], key: str, want=1) -> str:
    """`k/n` trials whose observation `key` equals `want` (truthy when want is 1/True)."""
    hits = sum((bool(r.get(key)) if want in (1, True) else r.get(key) == want) for r in rows)
    return f"{hits}/{len(rows)}"


def _max(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return f"{max(values):.3g}" if values else "–"


# name, how it fires, occurrence range, scenario(ref, work, occurrence), extra columns(rows) -> text
Scenario = tuple[str, str, tuple[int, int], Callable, Callable[[list[dict]], str]]

SCENARIOS: list[Scenario] = [
    ("`train.mid_step` kill", "SIGKILL after backward, before the optimizer step", (1, harness.STEPS),
     lambda ref, w, k: harness.crash_in_training(ref, w, "train.mid_step", k),
     lambda rows: f"resumed from the newest complete checkpoint {_n(rows, 'newest_complete_used')}"),
    ("`ckpt.mid_write` kill", "SIGKILL with model+optimizer files written, manifest not", (1, 6),
     lambda ref, w, k: harness.crash_in_training(ref, w, "ckpt.mid_write", k),
     lambda rows: f"partial dir left by the kill {_n(rows, 'partial_dirs')}; partial loaded "
                  f"{sum(r.get('partial_loaded', 0) for r in rows)}; temp dirs after resume "
                  f"{sum(r.get('temps_left', 0) for r in rows)}"),
    ("`export.mid_write` kill", "SIGKILL with the HF export complete in its temp dir", (1, 2),
     lambda ref, w, k: harness.crash_in_export(ref, w, k),
     lambda rows: f"export absent after kill {_n(rows, 'export_absent')}; exports byte-equal after resume "
                  f"{_n(rows, 'exports_equal')}"),
    ("`tokenize.mid_write` kill", "SIGKILL with a source's tokens.bin written, offsets/meta not", (1, 2),
     lambda ref, w, k: harness.crash_in_tokenize(ref, w, k),
     lambda rows: f"half-written cache only as temp dir {_n(rows, 'partial_only_temp')}; shards byte-equal to "
                  f"reference after resume {_n(rows, 'shards_equal')}"),
    ("`curate.mid_write` kill", "SIGKILL while datatrove's filter job reads/writes (41 docs)", (1, 41),
     lambda ref, w, k: harness.crash_in_curation(w, k),
     lambda rows: f"no _SUCCESS after kill {_n(rows, 'success_after_crash', 0)}; curated output = expected "
                  f"40 docs (junk removed) {_n(rows, 'curated_equal')}"),
    ("`ckpt.mid_write` ENOSPC, then RLIMIT_FSIZE", "OSError(ENOSPC) injected; then a real 3 MB file-size limit",
     (1, 6), lambda ref, w, k: harness.disk_full(ref, w, k),
     lambda rows: f"exit 1 with path + 'disk full' {_n(rows, 'enospc_message')}, with path + 'file size limit' "
                  f"{_n(rows, 'efbig_message')}; earlier checkpoints verify "
                  f"{_n(rows, 'enospc_previous_intact')} / {_n(rows, 'efbig_previous_intact')}; temp dirs left "
                  f"{sum(r.get('enospc_temps_left', 0) + r.get('efbig_temps_left', 0) for r in rows)}"),
    ("corrupted newest checkpoint", "SIGKILL mid-step, then one bit of model.safetensors flipped", (3, harness.STEPS),
     lambda ref, w, k: harness.corrupt_newest(ref, w, k),
     lambda rows: f"refused (exit 1) naming the file and the flag {_n(rows, 'refusal_mentions_flag')}; "
                  f"`--fallback-checkpoint` named it and finished {_n(rows, 'fallback_names_file')}"),
    ("NaN gradients, `on_fault: rollback`", "gradients set to NaN at one step; skip run vs rollback run",
     (2, harness.STEPS), lambda ref, w, k: harness.nan_rollback(ref, w, k),
     lambda rows: f"rolled back to the expected checkpoint (or skipped where the stage had none) "
                  f"{sum(r.get('rollbacks') == [r.get('expected_rollback')] for r in rows)}/{len(rows)}; "
                  f"skipped batch's documents logged "
                  f"{_n(rows, 'docs_logged')}; all tokens consumed "
                  f"{sum(r.get('tokens_consumed') == r.get('planned_tokens') for r in rows)}/{len(rows)}; "
                  f"listed in report {_n(rows, 'report_lists_skip')}"),
]


def run_trials(trials: int, seed: int, work: Path) -> dict[str, list[dict]]:
    harness.clean(work)
    ref = harness.make_reference(work / "reference")
    results: dict[str, list[dict]] = {}
    for name, _, (lo, hi), scenario, _ in SCENARIOS:
        rows = []
        # a seeded order of the range, cycled: distinct occurrences while trials <= the range's size
        order = random.Random(f"{seed}:{name}").sample(range(lo, hi + 1), hi - lo + 1)
        for t in range(trials):
            occurrence = order[t % len(order)]
            start = time.time()
            obs = scenario(ref, work / f"{len(results)}-{t}", occurrence)
            obs.update(occurrence=occurrence, seconds=round(time.time() - start, 1))
            rows.append(obs)
            print(f"{name} trial {t} (occurrence {occurrence}): losses equal {obs.get('losses_equal', '-')}, "
                  f"curated {obs.get('curated_equal', '-')} ({obs['seconds']}s)", flush=True)
        results[name] = rows
    return results


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| fault | injected | trials (occurrences) | point reached | run finished after resume | per-step losses "
             "equal to the uninterrupted run | max abs loss diff | other checks |", "|---|---|---|---|---|---|---|---|"]
    for name, how, _, _, extra in SCENARIOS:
        rows = results[name]
        occ = ", ".join(str(r["occurrence"]) for r in rows)
        losses = _n(rows, "losses_equal") if any("losses_equal" in r for r in rows) else "n/a (no training)"
        if "skip_rows" in rows[0]:
            losses += " (vs the skip run)"
        killed = f"died by SIGKILL {_n(rows, 'killed')}; " if "killed" in rows[0] else ""
        lines.append(f"| {name} | {how} | {len(rows)} ({occ}) | {_n(rows, 'reached')} | "
                     f"{_n(rows, 'resume_rc', 0)} | {losses} | {_max(rows, 'max_abs_diff')} | {killed}{extra(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/midtrain-reliability"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    args = parser.parse_args()
    start = time.time()
    results = run_trials(args.trials, args.seed, args.work)
    out = Path(__file__).with_name("results") / "reliability.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({k: [{kk: vv for kk, vv in r.items() if kk != "stderr"} for r in v]
                               for k, v in results.items()}, indent=1, default=str) + "\n")
    text = args.doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.doc}: markers {BEGIN} / {END} not found")
    stamp = (f"_{args.trials} trial(s) per row, seed {args.seed}, {time.time() - start:.0f} s; generated by "
             f"`python experiments/reliability.py --trials {args.trials}`._")
    head, rest = text.split(BEGIN, 1)
    args.doc.write_text(head + BEGIN + "\n" + table(results) + "\n\n" + stamp + "\n" + END + rest.split(END, 1)[1])
    print(table(results))
    print(f"wrote {args.doc} and {out}")


if __name__ == "__main__":
    main()
