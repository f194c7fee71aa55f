"""lm_head + cross-entropy, forward and backward from the final hidden states: full logits vs chunked.

Three ways to the same loss and gradients of hidden [N, d] and the head weight [V, d]: full [N, V] fp32 logits then
midtrain's in-place cross-entropy (the trainer's default), full logits then `F.cross_entropy`, and the chunked linear
cross-entropy (`loss_chunk_tokens`) at two chunk sizes. Time and the step's own memory (RSS growth of the first,
untimed step) per vocabulary size; fp32, as the trainer runs on CPUs without native bf16.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.common import BenchResult, interleaved, register


def _paths(n: int, d: int, vocab: int, chunks: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F

    from midtrain.model.head import HeadInputs
    from midtrain.model.loss import token_loss_sums

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, d, generator=gen).requires_grad_(True)
    weight = torch.nn.Parameter(torch.randn(vocab, d, generator=gen) / d**0.5)
    labels = torch.randint(0, vocab, (1, n), generator=gen)
    sources = torch.zeros_like(labels)

    def step(make: Callable[[], object], reuse: bool) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = weight.grad = None  # as zero_grad(set_to_none=True): gradients are fresh every step
            loss, _, _ = token_loss_sums(make(), labels, sources, 1, reuse_logits=reuse)
            (loss / n).backward()

        return run

    paths = {
        "full + in-place CE (default)": step(lambda: F.linear(hidden, weight), True),
        "full + F.cross_entropy": step(lambda: F.linear(hidden, weight), False),
    }
    for c in chunks:
        paths[f"chunked {c}"] = step(lambda c=c: HeadInputs(hidden, weight, c), False)
    return paths


@register("loss", "lm_head + cross-entropy fwd+bwd: full fp32 logits (in-place CE, F.cross_entropy) vs chunked")
def bench_loss(quick: bool = False, repeats: int | None = None, log: Callable[[str], None] = print) -> BenchResult:
    n, d = (2048, 128) if quick else (8192, 256)
    vocabs = (4096, 8192) if quick else (8192, 32768)
    chunks = (256, 1024) if quick else (1024, 4096)
    rows, summary = [], []
    for vocab in vocabs:
        log(f"loss: N={n} d={d} V={vocab} (logits {n * vocab * 4 / 2**20:.0f} MiB fp32)")
        t = interleaved(_paths(n, d, vocab, chunks), warmup=1, repeats=repeats or (2 if quick else 3), log=log)
        base = t["full + in-place CE (default)"]
        for name, timing in t.items():
            rows.append({"V": vocab, "path": name, "ms": timing.median * 1e3, "cpu_s": timing.cpu_median,
                         "step_rss_mb": timing.step_rss_mb, "x default time": timing.median / base.median})
        for c in chunks:
            got = t[f"chunked {c}"]
            memory = got.step_rss_mb / base.step_rss_mb if base.step_rss_mb and got.step_rss_mb else None
            summary.append({"figure": f"V={vocab}, chunk {c} / default", "time": got.median / base.median,
                            "step memory": memory})
    return BenchResult(
        name="loss",
        columns=["V", "path", "ms", "cpu_s", "step_rss_mb", "x default time"],
        rows=rows,
        summary=summary,
        notes=[f"N={n} tokens, d={d}, fp32; forward + backward of lm_head and the summed loss from hidden states",
               "step_rss_mb: RSS growth during the first (untimed) step, heap trimmed before it",
               f"full logits are N x V x 4 bytes: {', '.join(f'{n * v * 4 / 2**20:.0f} MiB' for v in vocabs)}"],
    )
