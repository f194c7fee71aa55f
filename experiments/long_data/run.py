"""Long-context data: per-source length upsampling with the domain mix kept vs upsampling the one long-text domain
(Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context").

    python experiments/long_data/run.py [--seeds 3] [--tokens 800k]

From the demo's shipped base (tiny-llama-4h pre-trained at L0 = 128 on retrieval 0.8 / prose 0.1 / code 0.1), extend
to 512 (YaRN x4, beta_fast 4) for the same tokens in three arms, with `recipe.yaml`:
  natural      retrieval 0.6 / prose 0.2 / code 0.2, documents drawn at their natural lengths;
  per-source   the same domain mix, `upsample_long: {min_tokens: 160, factor: 4}`: within every source, documents of
               160+ tokens get 4x their natural token weight (Fu et al.'s recipe);
  code-heavy   the long-text domain upsampled instead: code 0.6 / retrieval 0.3 / prose 0.1 (stdlib modules are the
               corpus's longest documents: Fu et al.'s "upsample books" baseline, which shifts the domain mix).
The retrieval source holds the demo's short retrieval documents (up to 128 tokens) and a quarter of its long ones
(153-510 tokens), so long documents are a minority there, as in real corpora. Metrics: passkey@512 (4x) and @128 on
100 seeded prompts, held-out loss per domain (100 documents each). Seeds: the extension's data order. Two runs at a
time, one thread each. Writes results.json and results.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import WORK, Stopwatch, fmt, run_recipe, table  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = WORK / "long_data"
UPSAMPLE = {"min_tokens": 160, "factor": 4}
ARMS = {
    "natural": ({"retrieval": 0.6, "prose": 0.2, "code": 0.2}, None),
    "per-source upsampling": ({"retrieval": 0.6, "prose": 0.2, "code": 0.2}, UPSAMPLE),
    "code-heavy (one long domain)": ({"code": 0.6, "retrieval": 0.3, "prose": 0.1}, None),
}
KEYS = ["passkey@512", "passkey@128", "loss.retrieval", "loss.general", "loss.code"]


def build() -> Path:
    """The demo's corpus (its base's tokenizer) with recall + a quarter of recall_long as one `retrieval` source."""
    from midtrain.demo import DEMO_BASE, build_corpus

    if not (OUT / "corpus" / "retrieval.jsonl").is_file():
        build_corpus(OUT, tokenizer_from=DEMO_BASE)
        corpus = OUT / "corpus"
        short = (corpus / "recall.jsonl").read_text().splitlines()
        long = (corpus / "recall_long.jsonl").read_text().splitlines()
        (corpus / "retrieval.jsonl").write_text("\n".join(short + long[: len(long) // 4]) + "\n")
    recipe = OUT / "recipe.yaml"
    recipe.write_text((HERE / "recipe.yaml").read_text())
    return recipe


def one_run(job: tuple[str, int, str]) -> dict:
    from midtrain.demo import DEMO_BASE

    arm, seed, tokens = job
    mixture, upsample = ARMS[arm]
    slug = arm.split(" ")[0]
    overrides = [f"base={DEMO_BASE}", f"seed={seed}", f"stages.extend.tokens={tokens}",
                 "stages.extend.data.mixture=" + json.dumps(mixture),
                 "stages.extend.data.upsample_long=" + json.dumps(upsample)]
    evals = run_recipe(OUT / "recipe.yaml", OUT / f"{slug}-seed{seed}-{tokens}", overrides)
    return {"after": evals["extend"], "before": evals["extend-before"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", default="800k")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    clock = Stopwatch()
    build()
    jobs = [(arm, seed, args.tokens) for seed in range(args.seeds) for arm in ARMS]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(one_run, jobs))
    runs: dict[str, list[dict]] = {}
    for (arm, seed, _), r in zip(jobs, results):
        runs.setdefault(arm, []).append(r["after"])
        print(f"{arm} seed {seed}: " + ", ".join(f"{k} {r['after'][k]:.4f}" for k in KEYS), flush=True)
    before = results[0]["before"]
    rows = [["base (before, YaRN applied)", *(f"{before[k]:.4f}" for k in KEYS)]]
    rows += [[arm, *(fmt([r[k] for r in rs]) for k in KEYS)] for arm, rs in runs.items()]
    natural, per_source, heavy = runs.values()
    for label, arm in (("Δ per-source − natural", natural), ("Δ per-source − code-heavy", heavy)):
        rows.append([label, *(fmt([a[k] - b[k] for a, b in zip(per_source, arm)]) for k in KEYS)])
    md = (f"Extension 128 → 512 for {args.tokens} tokens from the demo base, mean ± std over {args.seeds} seeds "
          f"(data orders; Δ rows pair equal seeds); {clock.minutes():.0f} min on this machine.\n\n"
          + table(["arm", *KEYS], rows) + "\n")
    (HERE / "results.json").write_text(json.dumps({"tokens": args.tokens, "before": before, "runs": runs}, indent=1))
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
