"""LongRoPE's searched factors without fine-tuning vs PI, NTK and YaRN at 2× and 4× (Ding et al. 2024).

    python experiments/longrope/run.py [--seeds 3] [--base-steps 800]

Data and base as in experiments/rope_extension.py (real stdlib code + synthetic key-value recall, BPE 2048, a
`tiny-llama` trained at L0 = 128 tokens), one base per seed (init and data order). For each base and s in {2, 4}:
`midtrain rope search BASE --target-length s*L0 --data search.jsonl` (the CLI a user runs; documents disjoint from
the evaluation's), then every method's perplexity at s*L0 on the same evaluation windows, no fine-tuning. Claim:
the searched factors beat PI and YaRN without fine-tuning. Writes results.json and results.md beside this file; the
bases and searches live under $MIDTRAIN_EXPERIMENTS_WORK (default /tmp/midtrain-experiments)/longrope (resumed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import WORK, table  # noqa: E402
from experiments.rope_extension import L0, Mixed, Windows, kv_documents, ppl, stdlib_files, train  # noqa: E402
from midtrain.context import apply_rope  # noqa: E402
from midtrain.data import train_bpe  # noqa: E402
from midtrain.model import build_model, load_model, preset_config  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = WORK / "longrope"
METHODS = {  # label -> rope block at factor s (None: the base's RoPE as trained)
    "none": lambda s: None,
    "PI (linear)": lambda s: {"method": "linear", "factor": s},
    "NTK (static)": lambda s: {"method": "ntk", "factor": s},
    "YaRN (β_fast 32, stock)": lambda s: {"method": "yarn", "factor": s, "original_max_position_embeddings": L0},
    "YaRN (β_fast 4 = L0/32)": lambda s: {"method": "yarn", "factor": s, "original_max_position_embeddings": L0,
                                          "beta_fast": L0 / 32},
}


def data(eval_docs: int):
    """Texts per domain and split (code split by file; the search never sees the evaluation's documents)."""
    code = stdlib_files(max_chars=24_000)
    return {"code": {"train": [t for i, t in enumerate(code) if i % 10 not in (0, 5)],
                     "search": [t for i, t in enumerate(code) if i % 10 == 5],
                     "eval": [t for i, t in enumerate(code) if i % 10 == 0]},
            "kv": {"train": kv_documents(600, 160, 0), "search": kv_documents(8, 160, 1),
                   "eval": kv_documents(eval_docs, 160, 2)}}


def midtrain(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "midtrain", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--eval-docs", type=int, default=16)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    texts = data(args.eval_docs)
    OUT.mkdir(parents=True, exist_ok=True)
    tok_dir = OUT / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe(texts["code"]["train"] + texts["kv"]["train"], 2048).save_pretrained(str(tok_dir))
    from midtrain.model import load_tokenizer

    tok = load_tokenizer(tok_dir)
    encode = lambda xs: [np.asarray(ids, dtype=np.int64) for ids in tok(xs, add_special_tokens=False)["input_ids"]]  # noqa: E731
    docs = {dom: {split: encode(xs) for split, xs in parts.items()} for dom, parts in texts.items()}
    for dom in docs:  # the same text at every length: the first 4·L0 tokens of each evaluation document
        docs[dom]["eval"] = [d[: 4 * L0] for d in docs[dom]["eval"] if len(d) >= 4 * L0][: args.eval_docs]
    search_file = OUT / "search.jsonl"  # alternating domains, as text: the CLI tokenizes with the checkpoint's own
    pairs = zip(texts["code"]["search"], texts["kv"]["search"])
    search_file.write_text("".join(json.dumps({"text": t}) + "\n" for pair in pairs for t in pair))

    rows: dict[tuple[str, int], list[dict]] = {}
    for seed in range(args.seeds):
        base_dir = OUT / f"base-seed{seed}"
        if not (base_dir / "config.json").is_file():
            model = build_model(preset_config("tiny-llama", vocab_size=len(tok)), seed=seed)
            mixed = Mixed([Windows(docs[dom]["train"], L0) for dom in docs])
            train(model, mixed, args.base_steps, 16, 3e-3, 30, seed)
            model.save_pretrained(str(base_dir))
            tok.save_pretrained(str(base_dir))
        base = load_model(base_dir)
        print(f"[{time.time() - t0:5.0f}s] base seed {seed} ready", flush=True)
        for s in (2, 4):
            target = s * L0
            search = OUT / f"search-seed{seed}-x{s}"
            midtrain("rope", "search", str(base_dir), "--target-length", str(target), "--data", str(search_file),
                     "--original", str(L0), "--population", str(args.population), "--generations",
                     str(args.generations), "--seed", str(seed), "--windows", "16", "--beta-fast", str(L0 / 32),
                     "--out", str(search))
            searched = yaml.safe_load((search / "rope.yaml").read_text())["rope"]
            for label, rope in [*((k, f(s)) for k, f in METHODS.items()), ("LongRoPE (searched)", searched)]:
                model = copy.deepcopy(base)
                apply_rope(model, rope)
                model.eval()
                scores = {dom: ppl(model, docs[dom]["eval"], target, 4 * args.eval_docs) for dom in docs}
                rows.setdefault((label, s), []).append(scores)
                print(f"[{time.time() - t0:5.0f}s] seed {seed} x{s} {label}: {scores}", flush=True)

    minutes = (time.time() - t0) / 60
    (HERE / "results.json").write_text(json.dumps(
        {"seeds": args.seeds, "base_steps": args.base_steps, "L0": L0, "minutes": minutes,
         "rows": [{"method": k[0], "factor": k[1], "ppl": v} for k, v in rows.items()]}, indent=1) + "\n")
    (HERE / "results.md").write_text(report(rows, args, minutes))
    print(report(rows, args, minutes))


def report(rows: dict, args, minutes: float) -> str:
    def cell(values: list[float]) -> str:
        return (f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1
                else f"{values[0]:.2f}")

    labels = list(dict.fromkeys(k[0] for k in rows))
    header = ["method", *(f"{dom} @{s * L0}" for s in (2, 4) for dom in ("code", "kv"))]
    body = [[label, *(cell([r[dom] for r in rows[(label, s)]]) for s in (2, 4) for dom in ("code", "kv"))]
            for label in labels]
    for other in ("PI (linear)", "YaRN (β_fast 4 = L0/32)", "YaRN (β_fast 32, stock)"):
        body.append([f"Δ LongRoPE − {other} (paired)",
                     *(cell([a[dom] - b[dom] for a, b in zip(rows[("LongRoPE (searched)", s)], rows[(other, s)])])
                       for s in (2, 4) for dom in ("code", "kv"))])
    return (f"Perplexity at 2× and 4× L0 = {L0} without fine-tuning (lower is better), mean ± std over "
            f"{args.seeds} bases (seeds; {args.base_steps} steps each); Δ pairs the same base. LongRoPE: "
            f"`midtrain rope search`, population {args.population}, {args.generations} generations, 16 windows of "
            f"the search split. {minutes:.0f} min on this machine.\n\n" + table(header, body) + "\n")


if __name__ == "__main__":
    main()
