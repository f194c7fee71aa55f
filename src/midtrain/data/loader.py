"""Packed, mixture-sampled, rank-sharded loader with exact resume (CONTRACTS §2).

Every rank walks the whole global batch (cheap: it is bookkeeping over document offsets) and copies tokens only for
its own rows, so the global batch and the loader state do not depend on world size: a run can resume on a different
number of ranks and see the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from midtrain.data.mixture import DeficitSampler
from midtrain.data.tokenize import TokenizedSource

STATE_VERSION = 1
Segment = tuple[int, int, int]  # (source index, start in the source's flat tokens, length)
PAD = -1  # source index of padding segments (split_documents=False): token 0, no loss, source id -1


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


@dataclass
class _Cursor:
    """Where one source stands: document `perm[cursor]` of `epoch`, `offset` tokens of it already emitted."""

    seed: int  # permutation seed; carried across stages so a cursor keeps meaning the same document
    epoch: int = 0
    cursor: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}


class PackedLoader:
    """Packs documents drawn by a token-quota mixture into `global_batch_seqs` rows of `seq_len` per step.

    Documents run back to back and one that does not fit continues at the start of the next row (as a new segment,
    position ids restarting at 0). With `split_documents=False` a document that fits in a row is never cut: when it
    does not fit in what is left of the current row, the rest of the row is padding (source -1, no loss) and the
    document opens the next row — what tasks whose answer depends on the whole document (retrieval) need. Rank r
    gets rows [r*n/W, (r+1)*n/W) split into micro-batches.
    """

    def __init__(
        self,
        sources: list[TokenizedSource],
        weights: list[float],
        *,
        seq_len: int,
        global_batch_seqs: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        micro_batch: int | None = None,
        split_documents: bool = True,
    ):
        if not sources:
            raise ValueError("PackedLoader needs at least one source")
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (got {names})")
        if seq_len < 1 or global_batch_seqs < 1 or world_size < 1:
            raise ValueError(f"seq_len={seq_len}, global_batch_seqs={global_batch_seqs}, world_size={world_size} "
                             "must all be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        if global_batch_seqs % world_size:
            raise ValueError(f"global_batch_seqs={global_batch_seqs} is not divisible by world_size={world_size}")
        per_rank = global_batch_seqs // world_size
        micro = per_rank if micro_batch is None else micro_batch
        if micro < 1 or per_rank % micro:
            raise ValueError(f"rows per rank ({global_batch_seqs}/{world_size} = {per_rank}) are not divisible by "
                             f"micro_batch={micro_batch}")
        self.sources = list(sources)
        self.seq_len, self.global_batch_seqs = seq_len, global_batch_seqs
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro
        self.seed = seed
        self.split_documents = split_documents
        self.sampler = DeficitSampler(weights)
        self.steps = 0
        self._cursors = [_Cursor(seed=seed) for _ in sources]
        self._active: int | None = None  # source whose current document spills over into the next row
        self._perms: dict[int, tuple[int, int, np.ndarray]] = {}  # source -> (seed, epoch, permutation)
        # Plain numpy views: memmap slicing through the subclass costs more than the copy itself.
        self._tokens = [np.asarray(s.tokens) for s in sources]
        self._offsets = [np.asarray(s.offsets, dtype=np.int64) for s in sources]
        # Instruction sources carry a loss mask (1 = response token); plain text sources train on every token.
        self._masks = [None if s.mask is None else np.asarray(s.mask) for s in sources]
        self._any_mask = any(m is not None for m in self._masks)

    # ---- document order ------------------------------------------------------------------------------------

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """Document order of `source` in `epoch`, seeded by (seed, source name, epoch): independent of the mixture."""
        c = self._cursors[source]
        cached = self._perms.get(source)
        if cached is None or cached[:2] != (c.seed, epoch):
            rng = np.random.default_rng([c.seed & (2**63 - 1), _name_key(self.sources[source].name), epoch])
            cached = (c.seed, epoch, rng.permutation(self.sources[source].n_docs))
            self._perms[source] = cached
        return cached[2]

    def _next_row(self) -> list[Segment]:
        segs: list[Segment] = []
        space = self.seq_len
        while space:
            if self._active is None:
                self._active = self.sampler.pick()
            s = self._active
            c = self._cursors[s]
            doc = int(self.permutation(s, c.epoch)[c.cursor])
            start = int(self._offsets[s][doc]) + c.offset
            end = int(self._offsets[s][doc + 1])
            if not self.split_documents and c.offset == 0 and space < end - start <= self.seq_len:
                segs.append((PAD, 0, space))  # the document stays whole: it opens the next row
                break
            n = min(end - start, space)
            segs.append((s, start, n))
            self.sampler.add(s, n)  # tokens actually emitted, so shares hold for truncated documents too
            space -= n
            if start + n == end:
                c.offset, c.cursor, self._active = 0, c.cursor + 1, None
                if c.cursor == self.sources[s].n_docs:
                    c.epoch, c.cursor = c.epoch + 1, 0
            else:
                c.offset += n
        return segs

    # ---- batches -------------------------------------------------------------------------------------------

    def _micro_batch(self, rows: list[list[Segment]]) -> dict[str, torch.Tensor]:
        segs = [seg for row in rows for seg in row]
        lens = np.fromiter((n for _, _, n in segs), dtype=np.int64, count=len(segs))
        src = np.fromiter((s for s, _, _ in segs), dtype=np.int64, count=len(segs))
        total = len(rows) * self.seq_len
        ids = np.empty(total, dtype=np.int64)
        pos = 0
        for s, start, n in segs:
            ids[pos : pos + n] = 0 if s == PAD else self._tokens[s][start : start + n]
            pos += n
        cu = np.zeros(len(segs) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)
        labels = np.where(position_ids == 0, -100, ids)  # a segment's first token is never predicted across a seam
        if self.split_documents is False:
            labels[np.repeat(src, lens) == PAD] = -100
        if self._any_mask:  # prompt tokens of instruction data carry no loss
            keep = np.ones(total, dtype=bool)
            pos = 0
            for s, start, n in segs:
                if s != PAD and self._masks[s] is not None:
                    keep[pos : pos + n] = self._masks[s][start : start + n].astype(bool)
                pos += n
            labels[~keep] = -100
        shape = (len(rows), self.seq_len)
        return {
            "input_ids": torch.from_numpy(ids).view(shape),
            "labels": torch.from_numpy(labels).view(shape),
            "position_ids": torch.from_numpy(position_ids).view(shape),
            "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
            "max_seqlen": torch.tensor(int(lens.max()), dtype=torch.int64),
            "source_ids": torch.from_numpy(np.repeat(src, lens)).view(shape),
        }

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step."""
        per_rank = self.global_batch_seqs // self.world_size
        lo = self.rank * per_rank
        rows = [self._next_row() for _ in range(self.global_batch_seqs)][lo : lo + per_rank]
        self.steps += 1
        m = self.micro_batch
        return [self._micro_batch(rows[i : i + m]) for i in range(0, per_rank, m)]

    # ---- state ---------------------------------------------------------------------------------------------

    def source_cursors(self) -> dict[str, dict]:
        """Per-source consumption keyed by name, for a following stage with a different mixture."""
        return {
            s.name: {**c.to_dict(), "fingerprint": s.fingerprint, "n_docs": s.n_docs}
            for s, c in zip(self.sources, self._cursors)
        }

    def load_source_cursors(self, cursors: dict[str, dict]) -> None:
        """Continue each named source where a previous loader stopped (sources not named start fresh).

        A partially emitted document continues from its offset the next time its source is picked.
        """
        for i, s in enumerate(self.sources):
            d = cursors.get(s.name)
            if d is None:
                continue
            if d["fingerprint"] != s.fingerprint:
                raise ValueError(f"source {s.name!r}: cursor was saved for data {d['fingerprint'][:12]}, "
                                 f"this source is {s.fingerprint[:12]}; its documents changed")
            self._cursors[i] = _Cursor(int(d["seed"]), int(d["epoch"]), int(d["cursor"]), int(d["offset"]))
        self._active = None

    def epochs(self) -> dict[str, int]:
        return {s.name: c.epoch for s, c in zip(self.sources, self._cursors)}

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "active": None if self._active is None else self.sources[self._active].name,
            "sources": self.source_cursors(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        names = [s.name for s in self.sources]
        if sorted(state["sources"]) != sorted(names):
            raise ValueError(f"loader state is for sources {sorted(state['sources'])}, this loader has {names}")
        self.load_source_cursors(state["sources"])
        self.sampler.load_state_dict(state["sampler"])
        self._active = None if state["active"] is None else names.index(state["active"])
        self.steps = int(state["steps"])
