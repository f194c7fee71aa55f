"""Which retrieval documents teach a 1.05M-parameter model a skill that transfers to the passkey format?

    python experiments/demo_retrieval/run.py --variant wide [--steps 1200] [--every 400]

The demo trains retrieval on templates of its own (never the evaluation's passkey wording) and is judged on the
passkey format. This trains `tiny-llama-4h` (`--preset`) on rows that start with one such document (80% of rows;
whole documents, REFERENCE §10's setting; the rest real prose), 32x128 per step, LR 1e-3 cosine to 10%, and prints
every `--every` steps: greedy accuracy on 100 held-out documents of its own templates ("own") and passkey@128
(100 prompts).

Variants (the document generator is `midtrain.demo.retrieval_documents`):
  wide   the demo's generator since 2026-11-24: three templates shaped like the passkey needle/question but worded
         otherwise, two intros, generated filler, and the thing named ("The {noun} is {key}.") a random pair of
         words from a 5,000-pair vocabulary drawn from the prose: the model must match the phrase, not memorise it
  fixed  the same with one intro and 12 fixed nouns ("secret code", "badge number", ...)
The `demo` rows of results.json are the generator before (nine varied templates, 12 fixed nouns, half real-prose
filler; `git show 4cb19dc:src/midtrain/demo.py`).
fp32, one torch thread. Appends a row per evaluation to results.json (keyed by variant).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import Stopwatch, corpus_dir, table  # noqa: E402
from experiments.rope_steps.run import L0, Rows, passkey_accuracy, train  # noqa: E402
from midtrain import demo  # noqa: E402
from midtrain.eval.generate import greedy_generate  # noqa: E402
from midtrain.model import build_model, load_tokenizer, preset_config  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXED_NOUNS = ["secret code", "access code", "secret number", "lucky number", "ticket number", "account number",
               "serial number", "combination", "PIN", "order number", "room number", "badge number"]


def names_for(variant: str, prose_docs: list[str]) -> list[str]:
    """The named things of `variant` (for `fixed`, also keeps only the memo intro)."""
    if variant == "fixed":
        demo._INTROS[:] = demo._INTROS[:1]
        return FIXED_NOUNS
    return demo.name_vocabulary(prose_docs)


def own_accuracy(model, tokenizer, docs: list[str]) -> float:
    """Greedy accuracy on documents cut right before their answer's number."""
    prompts, keys = [], []
    for doc in docs:
        m = re.search(r"(\d+)\.$", doc)
        prompts.append([tokenizer.bos_token_id] + tokenizer(doc[: m.start(1)].rstrip(), add_special_tokens=False)[
            "input_ids"])
        keys.append(m.group(1))
    outs = greedy_generate(model, prompts, 8, pad_id=0, eos_id=tokenizer.eos_token_id, batch_size=25)
    got = [re.search(r"\d+", tokenizer.decode(o)) for o in outs]
    return sum(g is not None and g.group(0) == k for g, k in zip(got, keys)) / len(keys)


def render(results: dict) -> str:
    """results.md: one row per run, accuracies at each evaluated step."""
    rows = []
    for name, run in results.items():
        steps = " / ".join(str(c["step"]) for c in run["curve"])
        stopped = f" (of {run['steps']}, stopped)" if run.get("stopped_at") else ""
        rows.append([name, f"{run['curve'][-1]['step']}{stopped}", steps,
                     " / ".join(f"{c['own']:.2f}" for c in run["curve"]),
                     " / ".join(f"{c['passkey@128']:.2f}" for c in run["curve"])])
    return ("One seed each; 32×128 per step, 80% of rows start with a retrieval document; 100 held-out documents "
            "(own) and 100 passkey prompts per evaluation.\n\n"
            + table(["variant", "steps", "evaluated at", "own templates", "passkey@128"], rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["wide", "fixed"], default="wide")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--preset", default="tiny-llama-4h",
                        help="model preset (tiny-llama: 2 heads of 64, the runs before 2026-11-24)")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    args = parser.parse_args()
    out = HERE / "results.json"
    if args.render:
        (HERE / "results.md").write_text(render(json.loads(out.read_text())))
        return
    torch.set_num_threads(1)
    clock = Stopwatch()
    corpus = corpus_dir()
    tokenizer = load_tokenizer(corpus / "tokenizer")
    prose_docs = [json.loads(line)["text"] for line in (corpus / "prose.jsonl").read_text().splitlines()]
    names = names_for(args.variant, prose_docs)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    train_docs = demo.retrieval_documents(12_000, int(0.3 * L0), L0 - 2, count, 1, names)
    held = demo.retrieval_documents(100, int(0.3 * L0), L0 - 2, count, 99, names)
    encoded = [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for d in train_docs]

    class DemoRows(Rows):
        def _passkey_doc(self) -> list[int]:
            return encoded[int(self.rng.integers(len(encoded)))]

    prose = np.asarray(tokenizer("\n".join(prose_docs), add_special_tokens=False)["input_ids"], dtype=np.int64)
    model = build_model(preset_config(args.preset, vocab_size=len(tokenizer)), seed=0)
    curve: list[dict] = []

    def check(step: int) -> bool:
        curve.append({"step": step, "own": own_accuracy(model, tokenizer, held),
                      "passkey@128": passkey_accuracy(model, tokenizer, L0, 100), "minutes": clock.minutes()})
        print(f"[{args.variant}] {curve[-1]}", flush=True)
        model.train()
        return False

    train(model, DemoRows(tokenizer, L0, 0.8, seed=1000, prose=prose), args.steps, 32, 1e-3, 20, every=args.every,
          check=check)
    results = json.loads(out.read_text()) if out.is_file() else {}
    key = args.variant if args.preset == "tiny-llama" else f"{args.variant}, {args.preset}"
    results[key] = {"steps": args.steps, "curve": curve}
    out.write_text(json.dumps(results, indent=1))
    (HERE / "results.md").write_text(render(results))


if __name__ == "__main__":
    main()
