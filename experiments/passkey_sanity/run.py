"""Can the passkey metric tell a model that retrieves from one that does not? (issue 5's sanity check)

    python experiments/passkey_sanity/run.py [--steps 300]

For each model preset (`tiny-llama`: 2 heads of 64; `tiny-llama-4h`: the same 1.05M parameters as 4 heads of 32), a
random-init model and the same model trained on passkey rows in the evaluation's own format at L = 128
(experiments/rope_steps' base: 1,200 steps of 32x128 at LR 1e-3, cached under WORK), then
fine-tuned `--steps` more steps at LR 3e-4 on rows whose tasks span the whole [104, 128] range, are scored on 100
held-out prompts (seeds no training row uses) at 110 and 128 tokens. fp32, one torch thread. Writes results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import Stopwatch, table  # noqa: E402
from experiments.rope_steps.run import L0, Rows, passkey_accuracy, tokenizer_and_prose, train, trained_base  # noqa: E402
from midtrain.model import build_model, preset_config  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = Stopwatch()
    tokenizer, prose = tokenizer_and_prose()

    def scores(model) -> list[float]:
        return [passkey_accuracy(model, tokenizer, length, 100) for length in (110, L0)]

    rows = []
    for preset in ("tiny-llama", "tiny-llama-4h"):
        config = preset_config(preset, vocab_size=len(tokenizer))
        rows.append([preset, "random init", "0", *(f"{s:.2f}" for s in scores(build_model(config, seed=0)))])
        model = trained_base(preset, tokenizer, prose)
        rows.append([preset, "trained on passkey rows (rope_steps base)", "1200",
                     *(f"{s:.2f}" for s in scores(model))])
        train(model, Rows(tokenizer, L0, 0.8, seed=7000, prose=prose), args.steps, 32, 3e-4, 10)
        rows.append([preset, f"+ {args.steps} steps at 3e-4", str(1200 + args.steps),
                     *(f"{s:.2f}" for s in scores(model))])
    md = (f"passkey accuracy on 100 held-out prompts per length (BOS + prompt + 12 answer tokens inside the length); "
          f"{clock.minutes():.0f} min on this machine.\n\n"
          + table(["preset", "model", "training steps (32x128)", "passkey@110", "passkey@128"], rows) + "\n")
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
