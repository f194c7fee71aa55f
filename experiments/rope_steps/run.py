"""Fine-tuning steps until passkey retrieval reaches 90% at 4x the training length: PI vs YaRN (YaRN, Peng et al.
2023, reports ~2.5x fewer steps than PI for the same extension).

    python experiments/rope_steps/run.py [--quick] [--seeds 1]

1. Base: `tiny-llama-4h` (1.05M parameters, 4 heads of 32; `--preset tiny-llama` for the 2-head model) trained at
   L0 = 128 on rows that start with a passkey document in the evaluation's own format (this experiment measures
   extension speed, not transfer: REFERENCE §10's setting) — 80% of rows, the rest real prose — 1,200 steps of
   32x128, LR 1e-3 cosine to 10% (for the 2-head model REFERENCE §10's 3e-3 gave 0.42 at 128, 1e-3 0.80). Checked:
   passkey@128 and @512.
2. For each method (PI factor 4; YaRN factor 4 with beta_fast = 4 = L0/32, "scaled"; stock YaRN beta_fast = 32):
   fine-tune at 512 on the same kind of rows (8x512 per step, LR 1e-3, 10 warm-up steps, cosine to 10% over the
   step cap), evaluating passkey@512 on 50 prompts every 50 steps; the first step with accuracy >= 0.9 is the answer.
Evaluation prompts use a seed no training document uses. fp32, one torch thread. Writes results.json / results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import WORK, Stopwatch, corpus_dir, table  # noqa: E402
from midtrain.context import apply_rope  # noqa: E402
from midtrain.eval.suite import run_generative  # noqa: E402
from midtrain.eval.tasks.base import TokenCounter, mean_by_metric, score  # noqa: E402
from midtrain.eval.tasks.haystack import NOISE, build_context  # noqa: E402
from midtrain.eval.tasks.retrieval import PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey_samples  # noqa: E402
from midtrain.model import build_model, forward_packed, load_tokenizer, preset_config  # noqa: E402
from midtrain.model.loss import token_loss_sums  # noqa: E402

HERE = Path(__file__).resolve().parent
L0, TARGET = 128, 512
METHODS = {
    "PI (linear x4)": {"method": "linear", "factor": 4},
    "YaRN x4, beta_fast 4 (scaled)": {"method": "yarn", "factor": 4, "original_max_position_embeddings": L0,
                                      "beta_fast": 4},
    "YaRN x4, beta_fast 32 (stock)": {"method": "yarn", "factor": 4, "original_max_position_embeddings": L0},
}


class Rows:
    """Training rows of `length` tokens: with probability `share` a passkey document (its answer appended) then
    prose, else prose only; documents are separate segments (position ids restart, no loss across the seam)."""

    def __init__(self, tokenizer, length: int, share: float, seed: int, prose: np.ndarray, no_intro: float = 0.0):
        self.count = TokenCounter(tokenizer)
        self.length, self.share, self.prose, self.no_intro = length, share, prose, no_intro
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.pool: list[list[int]] = []
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _passkey_doc(self) -> list[int]:
        if not self.pool:  # task lengths uniform in [max(0.3 T, 104), T], fresh keys per refill
            self.seed += 1_000
            # a task of length L holds BOS + prompt + 12 answer tokens; instructions and needle alone are ~90
            # tokens of this BPE, so shorter tasks cannot be built. A document is BOS + prompt + answer + EOS <= L.
            lengths = list(range(max(int(0.3 * self.length), 104), self.length + 1, max(1, self.length // 64)))
            for s in passkey_samples(self.count, lengths, 4, seed=self.seed):
                self.pool.append(self.bos + self.count.encode(s.prompt + " " + s.answers[0] + ".") + self.eos)
            # Without the 49-token intro a 128-token document has ~4x the filler: the needle really moves, so the
            # model learns to search rather than to read one position (`no_intro` of the documents).
            rng = random.Random(self.seed)
            for _ in range(round(len(self.pool) * self.no_intro / max(1e-9, 1 - self.no_intro))):
                k = str(rng.randint(1, 50000))
                room = rng.randint(max(int(0.3 * self.length), 56), self.length) - len(self.bos) - 12
                ctx = build_context(self.count, NOISE, room, prefix="", suffix=PASSKEY_QUESTION,
                                    needles=[(rng.random(), PASSKEY_NEEDLE.format(k=k))], rng=rng, cycle_from=0)
                self.pool.append(self.bos + self.count.encode(ctx.text + " " + k + ".") + self.eos)
            self.rng.shuffle(self.pool)
        return self.pool.pop()

    def batch(self, rows: int) -> dict[str, torch.Tensor]:
        ids, pos, labels = [], [], []
        for _ in range(rows):
            segs = []
            if self.rng.random() < self.share:
                segs.append(self._passkey_doc()[: self.length])
            rest = self.length - sum(len(s) for s in segs)
            if rest:
                start = int(self.rng.integers(0, len(self.prose) - rest))
                segs.append(self.prose[start : start + rest].tolist())
            row_ids = [t for s in segs for t in s]
            row_pos = [p for s in segs for p in range(len(s))]
            ids.append(row_ids)
            pos.append(row_pos)
            labels.append([-100 if p == 0 else t for t, p in zip(row_ids, row_pos)])
        return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}


def passkey_accuracy(model, tokenizer, length: int, n: int) -> float:
    samples = passkey_samples(TokenCounter(tokenizer), [length], n, seed=0)  # training uses seeds >= 1000
    model.eval()
    outputs = run_generative(model, tokenizer, samples, batch_size=25)
    model.train()
    return mean_by_metric(samples, [score(s, o) for s, o in zip(samples, outputs)])[f"passkey@{length}"]


def tokenizer_and_prose():
    """The experiments' BPE tokenizer and the real prose corpus as one token stream (the rows' filler)."""
    corpus = corpus_dir()
    tokenizer = load_tokenizer(corpus / "tokenizer")
    prose_text = "\n".join(json.loads(line)["text"] for line in (corpus / "prose.jsonl").read_text().splitlines())
    return tokenizer, np.asarray(tokenizer(prose_text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def train(model, rows: Rows, steps: int, batch: int, peak: float, warmup: int, every: int = 0,
          check=None) -> int | None:
    """Trains `steps` steps; with `check`, calls it every `every` steps and returns the first step it is True."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak, warmup)
        b = rows.batch(batch)
        loss_sum, _, _ = token_loss_sums(forward_packed(model, b), b["labels"], torch.zeros_like(b["labels"]), 1)
        (loss_sum / (b["labels"][:, 1:] != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if check is not None and (step + 1) % every == 0 and check(step + 1):
            return step + 1
    return None


def trained_base(preset: str, tokenizer, prose: np.ndarray, steps: int = 1200, lr: float = 1e-3,
                 no_intro: float = 0.0):
    """The base of step 1, trained once and cached under WORK (experiments/passkey_sanity reuses it)."""
    model = build_model(preset_config(preset, vocab_size=len(tokenizer)), seed=0)
    tag = (f"-nointro{no_intro:g}" if no_intro else "") + ("" if preset == "tiny-llama" else f"-{preset}")
    cached = WORK / "rope_steps" / f"base-{steps}-{lr:g}{tag}.pt"
    if cached.is_file():
        model.load_state_dict(torch.load(cached))
        return model
    train(model, Rows(tokenizer, L0, 0.8, seed=1000, prose=prose, no_intro=no_intro), steps, 32, lr, 20)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cached)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets: a smoke test, not the result")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune data orders per method")
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--base-steps", type=int, default=None, help="base steps (default 1200; --quick 200)")
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="tiny-llama-4h",
                        help="model preset (tiny-llama: 2 heads of 64, the runs before 2026-11-24)")
    parser.add_argument("--base-only", action="store_true", help="train and score the base, then stop")
    parser.add_argument("--no-intro", type=float, default=0.0,
                        help="share of base documents without the passkey intro (more filler, a moving needle)")
    parser.add_argument("--methods", default="all",
                        help="semicolon-separated prefixes of method names, e.g. 'PI;YaRN x4, beta_fast 4'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = Stopwatch()
    tokenizer, prose = tokenizer_and_prose()
    base_steps = args.base_steps or (200 if args.quick else 1200)
    cap = 100 if args.quick else args.max_steps

    model = trained_base(args.preset, tokenizer, prose, base_steps, args.base_lr, args.no_intro)
    base = {"passkey@128": passkey_accuracy(model, tokenizer, L0, 100),
            "passkey@512": passkey_accuracy(model, tokenizer, TARGET, 100), "minutes": clock.minutes()}
    print(f"base after {base_steps} steps at peak LR {args.base_lr}: {base}", flush=True)
    if args.base_only:
        return

    results: dict[str, list[dict]] = {}
    wanted = [m.strip() for m in args.methods.split(";")] if args.methods != "all" else [""]
    for name, rope in ((n, r) for n, r in METHODS.items() if any(n.startswith(w) for w in wanted)):
        for seed in range(args.seeds):
            ft = copy.deepcopy(model)
            apply_rope(ft, rope)
            curve: list[tuple[int, float]] = [(0, passkey_accuracy(ft, tokenizer, TARGET, 50))]

            def check(step: int, ft=ft, curve=curve, label=f"{name} seed {seed}") -> bool:
                curve.append((step, passkey_accuracy(ft, tokenizer, TARGET, 50)))
                print(f"  {label} step {step}: {curve[-1][1]:.2f}  ({clock.minutes():.1f} min)", flush=True)
                return curve[-1][1] >= 0.9

            reached = train(ft, Rows(tokenizer, TARGET, 0.8, seed=5000 + 100 * seed, prose=prose), cap, 8, 1e-3,
                            10, every=50, check=check)
            final = passkey_accuracy(ft, tokenizer, TARGET, 100)
            results.setdefault(name, []).append({"steps_to_0.9": reached, "curve": curve, "final@512": final,
                                                 "at_128": passkey_accuracy(ft, tokenizer, L0, 100)})
            print(f"{name} seed {seed}: reached 0.9 at {reached}, final {final:.2f}", flush=True)

    rows = []
    for name, rs in results.items():
        steps = [r["steps_to_0.9"] for r in rs]
        shown = ", ".join(str(s) if s is not None else f"> {cap}" for s in steps)
        rows.append([name, f"{rs[0]['curve'][0][1]:.2f}", shown, ", ".join(f"{r['final@512']:.2f}" for r in rs),
                     ", ".join(f"{r['at_128']:.2f}" for r in rs)])
    md = (f"Base after {base_steps} steps at 128: passkey@128 {base['passkey@128']:.2f}, passkey@512 "
          f"{base['passkey@512']:.2f}. Fine-tune at 512, 8×512 tokens per step, passkey@512 on 50 prompts every 50 "
          f"steps (cap {cap}); {args.seeds} fine-tune seed(s); {clock.minutes():.0f} min on this machine.\n\n"
          + table(["method", "passkey@512, no fine-tune", "steps to ≥ 0.9", "passkey@512 at stop (100 prompts)",
                   "passkey@128 at stop"], rows) + "\n")
    (HERE / ("results-quick.json" if args.quick else "results.json")).write_text(
        json.dumps({"base": base, "methods": results}, indent=1))
    if not args.quick:
        (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
