"""Toy mixture search and microanneal valuation with `midtrain mix` (docs/MIXTURES.md).

    python experiments/mixture_search/run.py [--proxies 12] [--tokens 60k] [--verify-seeds 2] [--seeds 3]

Builds a real-text corpus (Python's help topics, stdlib code, docstrings of stdlib packages) plus synthetic math and
a shuffled-words noise source, trains a BPE on it, then runs the CLI as a user would:
  1. `midtrain run` (pretrain + anneal): the pretrain stage's export is where both tools start;
  2. `midtrain mix search` on the anneal stage, target loss.docs (a domain no stage trains on), with --verify-seeds:
     the predicted, the recipe's and the uniform mixture trained at the proxies' budget and measured;
  3. `midtrain mix value` on the anneal stage for two candidates: math (a source of the recipe, 10% of the anneal
     already) and the noise file (a new path), same seeds, tokens and start.
Writes results.json and results.md beside this file. Everything lives under $MIDTRAIN_EXPERIMENTS_WORK
(default /tmp/midtrain-experiments)/mixture_search and is resumed when re-run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("MIDTRAIN_EXPERIMENTS_WORK", "/tmp/midtrain-experiments")) / "mixture_search"
DOC_PACKAGES = ("email", "json", "http", "logging", "urllib", "xml", "unittest", "wsgiref", "concurrent", "importlib",
                "html", "zoneinfo", "sqlite3", "xmlrpc", "dbm", "collections", "asyncio", "multiprocessing")


def docstring_documents(max_chars: int = 1_500) -> list[str]:
    """Docstrings of the stdlib's packages (module, class and function docs in source order), ~1.5 KB documents:
    technical English about code, a domain between the prose and the code sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for package in DOC_PACKAGES:
        for file in sorted((stdlib / package).rglob("*.py")):
            if "test" in file.parts[-2:] or file.name.startswith("test"):
                continue
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
            texts = [d.strip() for d in (ast.get_docstring(n) for n in nodes) if d and len(d.strip()) > 40]
            current = ""
            for text in texts:
                if current and len(current) + len(text) > max_chars:
                    docs.append(current)
                    current = ""
                current = f"{current}\n\n{text}" if current else text
            if len(current) > 200:
                docs.append(current)
    return docs


def noise_documents(prose: list[str], n: int, seed: int) -> list[str]:
    """The prose's words shuffled over the whole corpus: English unigram statistics, no syntax, no meaning."""
    rng = random.Random(seed)
    words = [w for d in prose for w in d.split()]
    rng.shuffle(words)
    size = max(1, len(words) // n)
    return [" ".join(words[i * size:(i + 1) * size]) for i in range(n)]


def build(work: Path) -> Path:
    """corpus/*.jsonl, tokenizer/ and recipe.yaml under `work` (kept when present)."""
    from midtrain.data.tokenizer import train_bpe
    from midtrain.demo import _write_jsonl, code_documents, math_documents, prose_documents

    recipe = work / "recipe.yaml"
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        corpus = work / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        prose = prose_documents()
        sources = {"prose": prose, "code": code_documents(), "math": math_documents(6000, seed=0),
                   "docs": docstring_documents(), "noise": noise_documents(prose, 400, seed=0)}
        for name, docs in sources.items():
            _write_jsonl(corpus / f"{name}.jsonl", docs)
        trained_on = [d for name in ("prose", "code", "math") for d in sources[name]]
        train_bpe(iter(trained_on), 2048).save_pretrained(str(work / "tokenizer"))
        print({name: len(docs) for name, docs in sources.items()}, flush=True)
    shutil.copyfile(HERE / "recipe.yaml", recipe)
    return recipe


def midtrain(*args: str) -> None:
    env = {**os.environ, "MIDTRAIN_CACHE": str(WORK / "cache"), "OMP_NUM_THREADS": "1"}
    print("$ midtrain " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "midtrain", *args], check=True, env=env, cwd=WORK)


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def tables(search: dict, values: list[dict]) -> str:
    names, v = search["sources"], search["verify"]
    seeds = len(next(iter(v.values()))["values"])
    lines = [f"Target `{search['target']}`, {len(search['proxies'])} proxies of "
             f"{search['settings']['tokens']:,} tokens, Dirichlet c = {search['settings']['concentration']:g}; "
             f"held-out Spearman {search['cv']['spearman']:.3f} ({search['cv']['scheme']}, model "
             f"{search['model']['kind']}). Measured: each mixture trained at the same budget, seeds "
             f"{','.join(map(str, v['predicted']['seeds']))}.", "",
             "| mixture | " + " | ".join(names) + " | predicted | measured |",
             "|---|" + "---|" * (len(names) + 2)]
    for label, mix in search["mixtures"].items():
        lines.append(f"| {label} | " + " | ".join(f"{mix[n]:.3f}" for n in names)
                     + f" | {search['predicted_value'][label]:.4f} | "
                     f"{fmt(v[label]['mean'], v[label]['std'], seeds)} |")
    for other in ("recipe", "uniform"):  # paired by seed: same seed = same init noise and data order
        diff = [a - b for a, b in zip(v["predicted"]["values"], v[other]["values"])]
        mean = sum(diff) / len(diff)
        std = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)) ** 0.5 if len(diff) > 1 else 0.0
        lines.append(f"| predicted − {other} (paired by seed) | " + " | " * len(names)
                     + f" | {mean:+.4f} ± {std:.4f} ({', '.join(f'{d:+.4f}' for d in diff)}) |")
    best = search["best_proxy"]
    lines.append(f"| best proxy (#{best['index']}, seed 0) | " + " | ".join(f"{best['mixture'][n]:.3f}" for n in names)
                 + f" | | {best['value']:.4f} |")
    for value in values:
        s = value["settings"]
        lines += ["", f"Candidate `{value['candidate']['name']}` at {s['fraction']:.0%} in the anneal "
                  f"({s['tokens']:,} tokens from the pretrain export, seeds {','.join(map(str, s['seeds']))}); "
                  "delta = with candidate - control, mean ± std over seeds.", "",
                  "| metric | control | with candidate | delta |", "|---|---|---|---|"]
        n = len(s["seeds"])
        for metric, d in value["deltas"].items():
            if metric.startswith("ppl"):
                continue
            lines.append(f"| {metric} | {fmt(d['control'], d['control_std'], n)} | "
                         f"{fmt(d['candidate'], d['candidate_std'], n)} | {d['delta']:+.4f} ± {d['delta_std']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, default=12)
    parser.add_argument("--tokens", default="40k", help="tokens per search proxy")
    parser.add_argument("--anneal-tokens", default="40k", help="tokens per valuation anneal")
    parser.add_argument("--verify-seeds", type=int, default=2, help="seeds of the search's verification runs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the valuation")
    args = parser.parse_args()
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    recipe = build(WORK)
    seeds = ",".join(str(s) for s in range(1, args.seeds + 1))
    verify = ",".join(str(s) for s in range(1, args.verify_seeds + 1))
    midtrain("run", str(recipe))  # the anneal's start checkpoint: the pretrain stage's export
    midtrain("mix", "search", str(recipe), "--stage", "anneal", "--target", "loss.docs", "--proxies",
             str(args.proxies), "--tokens", args.tokens, "--threads", "1", "--verify-seeds", verify,
             "--out", str(WORK / "search"))
    for candidate in ("math", str(WORK / "corpus" / "noise.jsonl")):
        midtrain("mix", "value", str(recipe), "--stage", "anneal", "--candidate", candidate, "--seeds", seeds,
                 "--tokens", args.anneal_tokens, "--threads", "1", "--out", str(WORK / "value"))
    search = json.loads((WORK / "search" / "summary.json").read_text())
    values = [json.loads((WORK / "value" / f"{name}-f0.3.json").read_text()) for name in ("math", "noise")]
    minutes = (time.time() - t0) / 60
    md = tables(search, values) + f"\nWall time of this invocation: {minutes:.1f} min (2 shared CPU cores).\n"
    (HERE / "results.md").write_text(md)
    (HERE / "results.json").write_text(json.dumps({"search": search, "value": values, "minutes": minutes},
                                                  indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
