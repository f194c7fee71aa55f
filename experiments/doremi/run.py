"""DoReMi beside RegMix and uniform at equal proxy compute (Xie et al. 2023; Liu et al. 2024), with `midtrain mix`.

    python experiments/doremi/run.py [--seeds 3] [--regmix-proxies 12] [--proxy-tokens 40k] [--doremi-tokens 200k]

The mixture-search experiment's toy (experiments/mixture_search: a pretrain stage, then an anneal whose mixture of
prose / code / math is optimised; target `loss.docs`, a held-out domain no stage trains on), run as a user would:
  1. `midtrain run` (pretrain + anneal): the pretrain stage's export is where every proxy starts;
  2. `midtrain mix search` (RegMix): 12 proxies of 40k tokens = 480k proxy tokens;
  3. `midtrain mix doremi`: a uniform-mixture reference and a Group-DRO proxy of 200k tokens each; the proxy's step
     also runs the reference's forward (1/3 of a step), so 200k + 4/3 x 200k ≈ 467k token-equivalents — about
     RegMix's budget;
  4. each method's mixture, the recipe's and uniform trained at the anneal's budget (40k tokens) with seeds 1..3 and
     scored on every domain's held-out loss.
Writes results.json and results.md beside this file; everything lives under $MIDTRAIN_EXPERIMENTS_WORK (default
/tmp/midtrain-experiments)/mixture_search (shared with that experiment) and is resumed when re-run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.mixture_search.run import WORK, build, midtrain  # noqa: E402

HERE = Path(__file__).resolve().parent
DOMAINS = ("docs", "general", "code", "math")


def measured(out: Path, label: str, seeds: list[int]) -> list[dict]:
    return [json.loads((out / "verify" / f"{label}-seed{s}" / "result.json").read_text())["metrics"] for s in seeds]


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def report(search: dict, doremi: dict, seeds: list[int], minutes: float) -> str:
    names = search["sources"]
    arms = {"RegMix (predicted)": (WORK / "search", "predicted", search["mixtures"]["predicted"]),
            "DoReMi (averaged)": (WORK / "doremi", "doremi", doremi["mixtures"]["doremi"]),
            "recipe": (WORK / "search", "recipe", search["mixtures"]["recipe"]),
            "uniform": (WORK / "search", "uniform", search["mixtures"]["uniform"])}
    runs = {arm: measured(out, label, seeds) for arm, (out, label, _) in arms.items()}
    header = ["mixture", *names, *(f"loss.{d}" for d in DOMAINS), "worst trained domain",
              "Δ loss.docs vs uniform (paired)", "Δ loss.docs vs RegMix (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def delta(arm: str, other: str) -> str:
        return "—" if arm == other else fmt([a["loss.docs"] - b["loss.docs"] for a, b in zip(runs[arm], runs[other])])

    for arm, (_, _, mix) in arms.items():
        ms = runs[arm]
        worst = [max(m[f"loss.{d}"] for d in DOMAINS if d != "docs") for m in ms]  # DoReMi's own objective
        lines.append("| " + " | ".join([arm, *(f"{mix[n]:.3f}" for n in names),
                                        *(fmt([m[f"loss.{d}"] for m in ms]) for d in DOMAINS), fmt(worst),
                                        delta(arm, "uniform"), delta(arm, "RegMix (predicted)")]) + " |")
    s, p = doremi["settings"], doremi["proxy"]
    regmix_tokens = len(search["proxies"]) * search["settings"]["tokens"]
    return (f"Proxy compute: RegMix {len(search['proxies'])} proxies × {search['settings']['tokens']:,} = "
            f"{regmix_tokens:,} tokens (held-out Spearman {search['cv']['spearman']:.3f}); DoReMi a reference and a "
            f"Group-DRO proxy of {s['tokens']:,} tokens each ({p['steps']} steps, η = {s['step_size']:g}, "
            f"c = {s['smoothing']:g}; ≈ {s['tokens'] * 7 / 3 / 1000:.0f}k token-equivalents with the reference's "
            "forward). "
            f"Each mixture then trained at the anneal's 40,000 tokens from the pretrain export, seeds "
            f"{','.join(map(str, seeds))}: held-out loss per domain, mean ± std; Δ pairs equal seeds. "
            f"This invocation: {minutes:.0f} min (finished runs are found, not trained again).\n\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--regmix-proxies", type=int, default=12)
    parser.add_argument("--proxy-tokens", default="40k", help="tokens per RegMix proxy")
    parser.add_argument("--doremi-tokens", default="200k", help="tokens of DoReMi's reference and of its proxy, each")
    args = parser.parse_args()
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    recipe = build(WORK)
    seeds = list(range(1, args.seeds + 1))
    verify = ",".join(map(str, seeds))
    midtrain("run", str(recipe))
    midtrain("mix", "search", str(recipe), "--stage", "anneal", "--target", "loss.docs", "--proxies",
             str(args.regmix_proxies), "--tokens", args.proxy_tokens, "--threads", "1", "--verify-seeds", verify,
             "--out", str(WORK / "search"))
    midtrain("mix", "doremi", str(recipe), "--stage", "anneal", "--tokens", args.doremi_tokens, "--threads", "1",
             "--target", "loss.docs", "--verify-seeds", verify,
             "--out", str(WORK / "doremi"))
    search = json.loads((WORK / "search" / "summary.json").read_text())
    doremi = json.loads((WORK / "doremi" / "summary.json").read_text())
    md = report(search, doremi, seeds, (time.time() - t0) / 60)
    (HERE / "results.md").write_text(md)
    (HERE / "results.json").write_text(json.dumps({"search": search, "doremi": doremi}, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
