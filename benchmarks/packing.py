"""Packed, document-masked batches against padded unpacked ones: useful (predicted) tokens per second.

All three sides run midtrain's real `Trainer.train_step()` on small-llama (fp32) with the same number of rows per
step and the same documents (uniform lengths in `DOC_LEN`, as in the trainer benchmark):

* **packed**: `PackedLoader` rows of seq_len tokens, several documents each, attention confined to each document.
* **padded to the longest**: one document per row (truncated to seq_len), right-padded to the longest row of the
  batch (what `DataCollatorWithPadding` does); pads carry no loss. Causal attention without a mask is exact here: the
  pads come after the document, so no real token sees one.
* **padded to seq_len**: the same, padded to the full row (`padding="max_length"`).

Useful tokens are the labels that carry loss (every token but each document's first, and no pads).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import BenchResult, interleaved, register
from benchmarks.trainer import make_loader, make_source, midtrain_step

PRESET = "small-llama"


class PaddedLoader:
    """One document per row, in a seeded random order, right-padded to the batch's longest row or to seq_len."""

    def __init__(self, source, seq_len: int, rows: int, to_longest: bool, seed: int = 0) -> None:
        self.source, self.seq_len, self.rows, self.to_longest = source, seq_len, rows, to_longest
        self.order = np.random.default_rng(seed).permutation(source.n_docs)
        self.cursor = 0

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        docs = []
        for _ in range(self.rows):
            i = int(self.order[self.cursor % len(self.order)])
            self.cursor += 1
            start, end = int(self.source.offsets[i]), int(self.source.offsets[i + 1])
            docs.append(self.source.tokens[start : min(end, start + self.seq_len)].astype(np.int64))
        width = max(len(d) for d in docs) if self.to_longest else self.seq_len
        ids = np.zeros((self.rows, width), dtype=np.int64)
        labels = np.full((self.rows, width), -100, dtype=np.int64)
        for r, d in enumerate(docs):
            ids[r, : len(d)] = d
            labels[r, 1 : len(d)] = d[1:]  # the first token is never predicted, pads never are
        position_ids = np.broadcast_to(np.arange(width), (self.rows, width)).copy()
        return [{"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                 "position_ids": torch.from_numpy(position_ids),
                 "source_ids": torch.zeros((self.rows, width), dtype=torch.int64)}]


def _useful(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _trainer_step(loader, seq_len: int, batch_tokens: int) -> Callable[[], int]:
    """A `Trainer.train_step` (the trainer benchmark's, fp32) on `loader`'s batches; returns the step's useful
    tokens."""
    useful: list[int] = []

    class Counting:  # records what the trainer consumed, without touching the batches
        def next_step(self):
            batches = loader.next_step()
            useful.append(_useful(batches))
            return batches

    train_step = midtrain_step(PRESET, seq_len, batch_tokens, "fp32", source=None, loader=Counting())

    def step() -> int:
        train_step()
        return useful[-1]

    return step


@register("packing", "packed + document-masked batches vs padded unpacked batches (useful tokens/s)")
def bench_packing(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    seq_len, rows = (256, 8) if quick else (1024, 8)
    source = make_source(2_000_000)
    sides = {
        "packed": make_loader(source, seq_len, rows * seq_len),
        "padded to the longest": PaddedLoader(source, seq_len, rows, to_longest=True),
        "padded to seq_len": PaddedLoader(source, seq_len, rows, to_longest=False),
    }
    steps = {name: _trainer_step(loader, seq_len, rows * seq_len) for name, loader in sides.items()}
    useful: dict[str, list[int]] = {name: [] for name in steps}

    def recorded(name: str) -> Callable[[], None]:
        return lambda: useful[name].append(steps[name]())

    log(f"packing: {PRESET}, seq {seq_len}, {rows} rows/step, fp32")
    timings = interleaved({name: recorded(name) for name in steps}, warmup=1, repeats=repeats or (2 if quick else 5),
                          log=log)
    result_rows = []
    for name, t in timings.items():
        per_step = float(np.median(useful[name][1:]))  # the warm-up step's batch is not timed
        result_rows.append({"batches": name, "seq_len": seq_len, "rows": rows, "step_s": t.median,
                            "useful_tokens_per_step": per_step, "useful_tokens_per_s": per_step / t.median,
                            "spread": t.spread(), "step_rss_mb": t.step_rss_mb})
    packed = result_rows[0]["useful_tokens_per_s"]
    summary = [{"comparison": f"packed / {r['batches']}", "ratio": packed / r["useful_tokens_per_s"]}
               for r in result_rows[1:]]
    return BenchResult(
        name="packing",
        columns=["batches", "seq_len", "rows", "step_s", "useful_tokens_per_step", "useful_tokens_per_s", "spread",
                 "step_rss_mb"],
        rows=result_rows,
        summary=summary,
        notes=["useful tokens: labels that carry loss; the same number of rows per step on every side",
               "document lengths uniform in [32, 512]; midtrain's Trainer (fp32, in-place loss) on every side"],
    )
