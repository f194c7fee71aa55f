"""Helpers shared by the data tests: synthetic and real-prose corpora, per-source token streams."""

from __future__ import annotations

import json
import pydoc_data.topics
import random
from pathlib import Path

import numpy as np
import torch


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


def prose_texts(n: int) -> list[str]:
    """Real English prose: paragraphs of the stdlib's pydoc topics, deduplicated."""
    paras = []
    for topic in sorted(pydoc_data.topics.topics):
        paras += [p.strip() for p in pydoc_data.topics.topics[topic].split("\n\n") if len(p.strip()) > 40]
    return list(dict.fromkeys(paras))[:n]


def random_texts(n: int, seed: int, lo: int = 1, hi: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + "".join(rng.choice("abcdefgh 0123456789é") for _ in range(rng.randint(lo, hi)))
            for i in range(n)]


def source_streams(batches: list[dict[str, torch.Tensor]], n_sources: int) -> list[np.ndarray]:
    """Per source, the tokens it emitted, in emission order."""
    ids = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    src = np.concatenate([b["source_ids"].numpy().ravel() for b in batches])
    return [ids[src == s] for s in range(n_sources)]
