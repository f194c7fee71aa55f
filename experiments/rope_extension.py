"""RoPE extension on a tiny Llama: every method at 2x and 4x the training length, before and after a short fine-tune.

    python experiments/rope_extension.py [--out experiments/results] [--quick]

1. Data (offline), two domains trained 50/50 and scored separately:
   `code`: real Python standard-library sources, split by file into train / search / eval;
   `kv` (synthetic, seeded): lines `set ab3 = 4821 ;` defining fresh keys and `get ab3 = 4821 ;` recalling a key
   defined anywhere earlier in the document, so the recalled digits are predictable only by retrieving far back.
   A byte-level BPE (vocab 2048, digits split one per token) is trained on the train split of both.
2. Base: `tiny-llama` (1.05M parameters, head_dim 64, theta 1e4) trained at L0 = 128 tokens.
3. For s in {2, 4}: none (default RoPE), PI (linear), NTK (static), YaRN (beta_fast = L0/32 = 4, REFERENCE §10),
   ABF (theta' = theta * s^2) and LongRoPE (factors found by `midtrain.context.search` on the search split):
   perplexity at s * L0 on the eval split (the same text at every length) without fine-tuning, then after the same
   fine-tune for each method (equal steps, tokens per step, data order and LR) at s * L0, plus perplexity at L0
   after it (short-context retention; in the JSON).
Writes rope_extension.json and rope_extension.md (the table in docs/ROPE.md). fp32, one thread by default: tiny
matmuls gain nothing from a second thread, and on shared cores OpenMP spinning makes two far slower.
"""

from __future__ import annotations

import argparse
import copy
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from midtrain.context import apply_rope
from midtrain.context.search import SearchConfig, longrope_search
from midtrain.data import train_bpe
from midtrain.eval.perplexity import perplexity_at_length
from midtrain.io import write_json_atomic, write_text_atomic
from midtrain.model import build_model, preset_config

L0 = 128
BASE_THETA = 1e4
METHODS = ("none", "pi", "ntk", "yarn", "abf", "longrope")


def rope_for(method: str, s: int, longrope_factors: list[float] | None = None) -> dict | None:
    if method == "none":
        return None
    if method == "pi":
        return {"method": "linear", "factor": s}
    if method == "ntk":
        return {"method": "ntk", "factor": s}
    if method == "yarn":
        return {"method": "yarn", "factor": s, "original_max_position_embeddings": L0, "beta_fast": L0 / 32}
    if method == "abf":
        return {"method": "abf", "rope_theta": BASE_THETA * s * s}
    assert longrope_factors is not None
    return {"method": "longrope", "factor": s, "original_max_position_embeddings": L0,
            "short_factor": [1.0] * len(longrope_factors), "long_factor": longrope_factors}


# ------------------------------------------------------------------------------------------------------- data
def stdlib_files(max_chars: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 3000:
            texts.append(text[:max_chars])
    return texts


def kv_documents(n: int, lines: int, seed: int) -> list[str]:
    """Key-value documents: a third of the lines recall a uniformly chosen earlier key (any distance back)."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    docs = []
    for _ in range(n):
        keys: dict[str, int] = {}
        out = []
        for i in range(lines):
            if i >= 4 and rng.random() < 1 / 3:
                key = list(keys)[rng.integers(len(keys))]
                out.append(f"get {key} = {keys[key]} ;")
            else:
                key = "".join(rng.choice(list(letters), 2)) + str(rng.integers(10))
                keys[key] = int(rng.integers(1000, 10000))
                out.append(f"set {key} = {keys[key]} ;")
        docs.append("\n".join(out))
    return docs


class Windows:
    """Random windows of exactly `length` tokens from documents at least that long (offsets uniform per token)."""

    def __init__(self, docs: list[np.ndarray], length: int):
        self.docs = [d for d in docs if len(d) >= length]
        if not self.docs:
            raise ValueError(f"no training document has {length} tokens")
        self.length = length
        weights = np.array([len(d) - length + 1 for d in self.docs], dtype=np.float64)
        self.p = weights / weights.sum()

    def batch(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        rows = []
        for i in rng.choice(len(self.docs), size=size, p=self.p):
            start = rng.integers(0, len(self.docs[i]) - self.length + 1)
            rows.append(self.docs[i][start : start + self.length])
        return torch.from_numpy(np.stack(rows))


# --------------------------------------------------------------------------------------------------- training
class Mixed:
    """Equal shares of several domains' windows in every batch."""

    def __init__(self, parts: list[Windows]):
        self.parts = parts

    def batch(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        share = size // len(self.parts)
        return torch.cat([w.batch(rng, share) for w in self.parts])


def train(model, windows: Windows | Mixed, steps: int, batch: int, lr: float, warmup: int, seed: int) -> float:
    """AdamW, linear warm-up then cosine to 10%; returns the mean loss of the last 10% of steps."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    tail = []
    for step in range(steps):
        frac = step / max(1, steps - 1)
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids = windows.batch(rng, batch)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    model.eval()
    return float(np.mean(tail))


def ppl(model, docs, length: int, windows: int) -> float:
    return perplexity_at_length(model, docs, length, max_windows=windows, batch_size=4)["ppl"]


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the script")
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--ft-steps", type=int, default=60)
    ap.add_argument("--eval-docs", type=int, default=16, help="documents per domain, 4*L0 tokens each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.ft_steps, args.eval_docs = 40, 4, 4
    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731

    code = stdlib_files(max_chars=24_000)
    texts = {  # code split by file: the search never sees the documents the table is measured on
        "code": {"train": [t for i, t in enumerate(code) if i % 10 not in (0, 5)],
                 "search": [t for i, t in enumerate(code) if i % 10 == 5],
                 "eval": [t for i, t in enumerate(code) if i % 10 == 0]},
        "kv": {"train": kv_documents(600, 160, args.seed), "search": kv_documents(8, 160, args.seed + 1),
               "eval": kv_documents(args.eval_docs, 160, args.seed + 2)},
    }
    tok = train_bpe(texts["code"]["train"] + texts["kv"]["train"], 2048)
    encode = lambda xs: [np.asarray(ids, dtype=np.int64) for ids in tok(xs, add_special_tokens=False)["input_ids"]]  # noqa: E731
    docs = {dom: {split: encode(xs) for split, xs in parts.items()} for dom, parts in texts.items()}
    n_tokens = {f"{dom}/{split}": int(sum(map(len, d))) for dom, parts in docs.items() for split, d in parts.items()}
    for dom in docs:  # the same text at every length: the first 4·L0 tokens of each eval document
        docs[dom]["eval"] = [d[: 4 * L0] for d in docs[dom]["eval"] if len(d) >= 4 * L0][: args.eval_docs]
    counts = ", ".join(f"{dom} {len(docs[dom]['eval'])}" for dom in docs)
    log(f"data: tokens {n_tokens}; eval documents of {4 * L0} tokens: {counts}")

    def evaluate(model, length: int) -> dict[str, float]:
        return {dom: ppl(model, docs[dom]["eval"], length, 4 * args.eval_docs) for dom in docs}

    base = build_model(preset_config("tiny-llama", vocab_size=len(tok)), seed=args.seed)
    mixed = lambda length: Mixed([Windows(docs[dom]["train"], length) for dom in docs])  # noqa: E731
    base_loss = train(base, mixed(L0), args.base_steps, 16, 3e-3, 30, args.seed)
    results: dict = {"L0": L0, "base_steps": args.base_steps, "ft_steps": args.ft_steps, "tokens": n_tokens,
                     "base_ppl_L0": evaluate(base, L0), "rows": []}
    log(f"base trained at L0={L0}: {args.base_steps} steps x 16 x {L0}, final train loss {base_loss:.3f}, "
        f"eval ppl at L0 {results['base_ppl_L0']}")
    for s in (2, 4):
        target = s * L0
        search_cfg = SearchConfig(target_length=target, original=L0, population=8 if not args.quick else 4,
                                  generations=4 if not args.quick else 1, seed=args.seed, beta_fast=L0 / 32,
                                  max_windows=16)
        # One window of `target` tokens per search document, alternating domains (16 windows: 8 + 8).
        pairs = zip(*([d[:target] for d in docs[dom]["search"] if len(d) >= target] for dom in docs))
        search_docs = [d for pair in pairs for d in pair]
        result = longrope_search(copy.deepcopy(base), search_docs, search_cfg)
        log(f"s={s}: LongRoPE search on the search split: loss {result.init_loss:.3f} (YaRN ramp) -> "
            f"{result.best_loss:.3f} in {result.evaluations} evaluations")
        for method in METHODS:
            rope = rope_for(method, s, result.best)
            model = copy.deepcopy(base)
            apply_rope(model, rope)
            before = evaluate(model, target)
            # Equal fine-tune for every method: same steps, tokens per step (16 * L0), data order and LR shape.
            ft_loss = train(model, mixed(target), args.ft_steps, 16 // s, 1e-3, 10, args.seed + s)
            after, short = evaluate(model, target), evaluate(model, L0)
            row = {"factor": s, "length": target, "method": method, "rope": rope, "ppl_no_ft": before,
                   "ppl_ft": after, "ppl_L0_after_ft": short, "ft_final_train_loss": ft_loss}
            if method == "longrope":
                row["search"] = {"init_loss": result.init_loss, "best_loss": result.best_loss,
                                 "evaluations": result.evaluations, "long_factor": result.best}
            results["rows"].append(row)
            log(f"s={s} {method:8s} ppl@{target} no FT {fmt(before)}  FT {fmt(after)}  ppl@{L0} after FT {fmt(short)}")
    results["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "rope_extension.json", results)
    write_text_atomic(args.out / "rope_extension.md", table(results))
    print(table(results))
    log(f"wrote {args.out / 'rope_extension.json'} and {args.out / 'rope_extension.md'}")


def fmt(values: dict[str, float]) -> str:
    return " ".join(f"{dom} {v:8.2f}" for dom, v in values.items())


def table(results: dict) -> str:
    names = {"none": "none", "pi": "PI (linear)", "ntk": "NTK (static)", "yarn": "YaRN (β_fast 4)",
             "abf": "ABF (θ·s²)", "longrope": "LongRoPE (searched)"}
    n = results["L0"]
    by = {(r["method"], r["factor"]): r for r in results["rows"]}
    lines = [
        f"| method | code @{2 * n} no FT | code @{2 * n} FT | kv @{2 * n} no FT | kv @{2 * n} FT "
        f"| code @{4 * n} no FT | code @{4 * n} FT | kv @{4 * n} no FT | kv @{4 * n} FT |",
        "|---|" + "---:|" * 8,
    ]
    for method in METHODS:
        cells = []
        for s in (2, 4):
            r = by.get((method, s))
            for dom in ("code", "kv"):
                cells += [f"{r['ppl_no_ft'][dom]:.2f}", f"{r['ppl_ft'][dom]:.2f}"] if r else ["-", "-"]
        lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    base = results["base_ppl_L0"]
    lines.append("")
    lines.append(f"Perplexity (lower is better) at 2× and 4× L0 = {n}; the base model at {n} tokens: code "
                 f"{base['code']:.2f}, kv {base['kv']:.2f}. {results['base_steps']} base steps, "
                 f"{results['ft_steps']} fine-tune steps per method; {results['seconds']:.0f} s in all.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
