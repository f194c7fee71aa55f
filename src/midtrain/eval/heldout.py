"""Held-out loss and perplexity per domain: the forgetting and target-domain metrics of a stage.

Held-out documents are packed (document-masked, like training) into fixed rows, deterministically, so the same
checkpoint always gets the same numbers and before/after evaluations of a stage are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from midtrain.eval.keys import MetricKey
from midtrain.model.loss import IGNORE, token_loss_sums

Batch = dict[str, torch.Tensor]


Document = tuple[np.ndarray, int] | tuple[np.ndarray, int, np.ndarray | None]


def pack_documents(docs: Sequence[Document], seq_len: int, rows_per_batch: int = 8) -> list[Batch]:
    """Greedy packing of (tokens, source_id[, loss mask]) documents into rows; longer documents are truncated.

    A loss mask (uint8 per token, 1 = scored) limits the loss to those tokens, as in training: an instruction
    sample's held-out loss covers its response tokens only (TokenizedSource.holdout_masks).
    """
    rows: list[list[tuple[np.ndarray, int, np.ndarray | None]]] = [[]]
    used = 0
    for tokens, src, *rest in docs:
        mask = rest[0] if rest else None
        tokens = np.asarray(tokens[:seq_len], dtype=np.int64)
        if mask is not None:
            mask = np.asarray(mask[:seq_len]).astype(bool)
        if used + len(tokens) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((tokens, src, mask))
        used += len(tokens)
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start : start + rows_per_batch]
        ids = np.zeros((len(chunk), seq_len), dtype=np.int64)
        pos = np.zeros_like(ids)
        labels = np.full_like(ids, IGNORE)
        srcs = np.full_like(ids, -1)
        lens: list[int] = []
        for r, row in enumerate(chunk):
            at = 0
            for tokens, src, mask in row:
                n = len(tokens)
                ids[r, at : at + n] = tokens
                pos[r, at : at + n] = np.arange(n)
                labels[r, at + 1 : at + n] = tokens[1:]  # a document's first token is never predicted
                if mask is not None:
                    labels[r, at : at + n][~mask] = IGNORE
                srcs[r, at : at + n] = src
                lens.append(n)
                at += n
            if at < seq_len:  # padding is its own (ignored) segment
                pos[r, at:] = np.arange(seq_len - at)
                lens.append(seq_len - at)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        batches.append(
            {
                "input_ids": torch.from_numpy(ids),
                "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(pos),
                "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": torch.tensor(max(lens)),
                "source_ids": torch.from_numpy(srcs),
            }
        )
    return batches


@torch.no_grad()
def heldout_metrics(
    model: nn.Module,
    forward: Callable[[nn.Module, Batch], torch.Tensor],
    batches: Sequence[Batch],
    domains: Sequence[str],
    *,
    device: torch.device,
    precision: str = "bf16-mixed",
) -> dict[str, float]:
    """`loss`, `ppl` overall and `loss.<domain>`, `ppl.<domain>` (token-weighted over each domain's documents).

    Collective under FSDP: every rank must call it with the same batches.
    """
    was_training = model.training
    model.eval()
    n = len(domains)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = forward(model, batch)
        _, per_source, count = token_loss_sums(logits, batch["labels"], batch["source_ids"], n)
        sums += per_source.double().cpu()
        counts += count.double().cpu()
    model.train(was_training)
    metrics: dict[str, float] = {}
    by_domain: dict[str, list[float]] = {}
    for src, domain in enumerate(domains):
        acc = by_domain.setdefault(domain, [0.0, 0.0])
        acc[0] += float(sums[src])
        acc[1] += float(counts[src])
    total = [0.0, 0.0]
    for domain, (s, c) in sorted(by_domain.items()):
        if c > 0:
            metrics[str(MetricKey("loss", domain=domain))] = s / c
            metrics[str(MetricKey("ppl", domain=domain))] = math.exp(min(s / c, 50.0))
            total[0] += s
            total[1] += c
    if total[1] > 0:
        metrics["loss"] = total[0] / total[1]
        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
    return metrics
