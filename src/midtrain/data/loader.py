"""Packed, mixture-sampled, rank-sharded loader with exact resume (CONTRACTS §2).

Every rank walks the whole global batch (cheap: it is bookkeeping over document offsets) and copies tokens only for
its own rows, so the global batch and the loader state do not depend on world size: a run can resume on a different
number of ranks and see the same data.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch

from midtrain.data.cursors import (
    ORDER,
    LengthSegment,
    ReadPosition,
    SourceCursor,
    changed_source_message,
    read_positions,
)
from midtrain.data.mixture import Bucket, DeficitSampler
from midtrain.data.order import DocumentOrder, ShuffledTail, order_key
from midtrain.data.tokenize import TokenizedSource

STATE_VERSION = 1
SCAN = 1 << 16  # documents per step when scanning lengths (bounded memory whatever the corpus size)
Segment = tuple[int, int, int]  # (source index, start in the source's flat tokens, length)
PAD = -1  # source index of padding segments (split_documents=False): token 0, no loss, source id -1


def _plain(tokens):
    """A memmap as a plain ndarray view; anything else (a pretokenized.TokenView) as it is."""
    return np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


class PackedLoader:
    """Packs documents drawn by a token-quota mixture into `global_batch_seqs` rows of `seq_len` per step.

    Documents run back to back and one that does not fit continues at the start of the next row (as a new segment,
    position ids restarting at 0). With `split_documents=False` a document that fits in a row is never cut: when it
    does not fit in what is left of the current row, the rest of the row is padding (source -1, no loss) and the
    document opens the next row — what tasks whose answer depends on the whole document (retrieval) need. Rank r
    gets rows [r*n/W, (r+1)*n/W) split into micro-batches. `order` 0 stores a permutation per epoch (what cursors
    saved before seeded bijections read; benchmarks/scale.py compares the two).
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
        length_buckets: list[list[Bucket] | None] | None = None,
        order: int = ORDER,
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
        if order not in (0, 1):
            raise ValueError(f"order={order}: 1 (seeded bijections) or 0 (stored permutations, as before)")
        self._cursors = [SourceCursor(seed=seed, order=order) for _ in sources]
        # (source, segment, bucket) whose current document spills over into the next row
        self._active: tuple[int, int, int] | None = None
        self._orders: dict[int, dict[tuple[int, int, int], object]] = {}  # source -> {(seed, order, epoch): order}
        if length_buckets is not None and len(length_buckets) != len(sources):
            raise ValueError(f"{len(length_buckets)} length-bucket lists for {len(sources)} sources")
        self.length_buckets = list(length_buckets) if length_buckets is not None else [None] * len(sources)
        # Offsets stay as they are (memory-mapped caches): nothing here is allocated per document.
        self._offsets = [np.asarray(s.offsets, dtype=np.int64) for s in sources]
        self._bucket_samplers = [None if b is None else DeficitSampler([w for _, _, w in b])
                                 for b in self.length_buckets]
        self._bucket_segs: list[list[list[int]]] = []  # source -> bucket -> its segment indices
        # (source, epoch, segment, chunk) -> positions in that chunk of the order whose length is in the segment
        self._hits: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._occupied: dict[tuple[int, int, int | None], bool] = {}  # (source, lo, hi) -> any document that long
        self._refine()
        # Plain numpy views: memmap slicing through the subclass costs more than the copy itself. Pre-tokenized
        # sources over many shards keep their TokenView (slicing within a document; asarray would read it all).
        self._tokens = [_plain(s.tokens) for s in sources]
        # Instruction sources carry a loss mask (1 = response token); plain text sources train on every token.
        self._masks = [None if s.mask is None else _plain(s.mask) for s in sources]
        self._any_mask = any(m is not None for m in self._masks)

    # ---- document order ------------------------------------------------------------------------------------

    def permutation(self, source: int, epoch: int):
        """Document order of `source` in `epoch`, seeded by (seed, source name, epoch): independent of the mixture.
        Indexable by position (int, slice or array) with `len()`; `np.asarray` gives the whole order (small
        sources only)."""
        c = self._cursors[source]
        cache = self._orders.setdefault(source, {})
        order = cache.get((c.seed, c.order, epoch))
        if order is None:
            name, n = self.sources[source].name, self.sources[source].n_docs
            if c.order == 0:
                rng = np.random.default_rng([c.seed & (2**63 - 1), _name_key(name), epoch])
                order = rng.permutation(n)
            else:
                order = DocumentOrder(n, order_key(c.seed, name, epoch))
            if len(cache) >= 4:  # segments of one source may stand in different epochs: keep a few
                cache.pop(next(iter(cache)))
            cache[(c.seed, c.order, epoch)] = order
        return order

    def _doc_length(self, s: int, doc) -> np.ndarray | int:
        o = self._offsets[s]
        return o[doc + 1] - o[doc]

    # ---- length buckets ------------------------------------------------------------------------------------

    def _refine(self) -> None:
        """Split segments at this loader's bucket bounds; map each bucket to its segments; check every bucket with a
        share has documents."""
        self._bucket_segs, self._hits = [], {}
        for s, buckets in enumerate(self.length_buckets):
            c = self._cursors[s]
            for lo, hi, _ in buckets or []:
                for at in (lo, hi):
                    if at is not None:
                        self._split(s, at)
            if buckets is None:
                self._bucket_segs.append([list(range(len(c.segments)))])
                continue
            groups = [[k for k, g in enumerate(c.segments) if g.lo >= lo and (hi is None or (g.hi is not None
                                                                                          and g.hi <= hi))]
                      for lo, hi, _ in buckets]
            self._bucket_segs.append(groups)
            for lo, hi, share in buckets:
                if share > 0 and not self._has_documents(s, lo, hi):
                    lengths = np.diff(self._offsets[s])  # only to word the error
                    raise ValueError(f"source {self.sources[s].name!r}: no document of {lo} <= tokens < "
                                     f"{hi if hi is not None else 'inf'} for a length bucket with share {share:g} "
                                     f"(documents have {int(lengths.min())}..{int(lengths.max())} tokens)")

    def _has_documents(self, s: int, lo: int, hi: int | None) -> bool:
        """Whether source `s` has a document of lo <= length < hi: a scan in steps of SCAN, stopping at the first."""
        key = (s, lo, hi)
        if key not in self._occupied:
            o, found = self._offsets[s], False
            for a in range(0, len(o) - 1, SCAN):
                lengths = np.diff(o[a : a + SCAN + 1])
                if np.any((lengths >= lo) & ((lengths < hi) if hi is not None else True)):
                    found = True
                    break
            self._occupied[key] = found
        return self._occupied[key]

    def _split(self, s: int, at: int) -> None:
        segs = self._cursors[s].segments
        for k, g in enumerate(segs):
            if g.lo < at and (g.hi is None or at < g.hi):
                right = LengthSegment(at, g.hi, g.epoch, g.pos, 0)
                g.hi = at
                if g.offset:  # the partly emitted document stays with the part that holds its length
                    doc = int(self.permutation(s, g.epoch)[g.pos])
                    if right.contains(int(self._doc_length(s, doc))):
                        right.offset, g.offset = g.offset, 0
                segs.insert(k + 1, right)
                return

    def _next_position(self, s: int, epoch: int, k: int, start: int) -> int | None:
        """The first position >= `start` in `epoch`'s order whose document belongs to segment `k` (None: no more
        this epoch). The order is scanned a chunk at a time and each chunk's hits are kept, so reading a segment
        through a whole epoch costs one pass over the order, in bounded memory."""
        g = self._cursors[s].segments[k]
        if not self._has_documents(s, g.lo, g.hi):
            return None
        order, n = self.permutation(s, epoch), self.sources[s].n_docs
        c = start // SCAN
        while c * SCAN < n:
            key = (s, epoch, k, c)
            hits = self._hits.get(key)
            if hits is None:
                lo = c * SCAN
                lengths = self._doc_length(s, np.asarray(order[lo : min(n, lo + SCAN)], dtype=np.int64))
                hits = lo + np.flatnonzero((lengths >= g.lo) & ((lengths < g.hi) if g.hi is not None else True))
                if len(self._hits) >= 64:
                    self._hits.clear()
                self._hits[key] = hits
            i = int(np.searchsorted(hits, start))
            if i < len(hits):
                return int(hits[i])
            c += 1
        return None

    def _next_document(self, s: int, b: int) -> int:
        """The segment of bucket `b` of source `s` that serves next (its `pos` set to the document): a partly
        emitted document first, else the least consumed one (lowest epoch, then permutation order)."""
        segs = self._cursors[s].segments
        group = self._bucket_segs[s][b]
        for k in group:
            if segs[k].offset:
                return k
        if len(segs) == 1:  # no buckets ever: the plain cursor
            return 0
        best: tuple[int, int, int] | None = None
        for k in group:
            g = segs[k]
            p = self._next_position(s, g.epoch, k, g.pos)
            if p is None:
                if not self._has_documents(s, g.lo, g.hi):
                    continue  # no document of this length range
                g.epoch, g.pos = g.epoch + 1, 0
                p = self._next_position(s, g.epoch, k, 0)
            if best is None or (g.epoch, p) < best[:2]:
                best = (g.epoch, p, k)
        assert best is not None, "checked in _refine: every bucket with a share has documents"
        segs[best[2]].pos = best[1]
        return best[2]

    def _next_row(self) -> list[Segment]:
        segs: list[Segment] = []
        space = self.seq_len
        while space:
            if self._active is None:
                s = self.sampler.pick()
                bucket_sampler = self._bucket_samplers[s]
                b = bucket_sampler.pick() if bucket_sampler is not None else 0
                self._active = (s, self._next_document(s, b), b)
            s, k, b = self._active
            g = self._cursors[s].segments[k]
            doc = int(self.permutation(s, g.epoch)[g.pos])
            start = int(self._offsets[s][doc]) + g.offset
            end = int(self._offsets[s][doc + 1])
            if not self.split_documents and g.offset == 0 and space < end - start <= self.seq_len:
                segs.append((PAD, 0, space))  # the document stays whole: it opens the next row
                break
            n = min(end - start, space)
            segs.append((s, start, n))
            self.sampler.add(s, n)  # tokens actually emitted, so shares hold for truncated documents too
            if self._bucket_samplers[s] is not None:
                self._bucket_samplers[s].add(b, n)
            space -= n
            if start + n == end:
                g.offset, g.pos, self._active = 0, g.pos + 1, None
                if g.pos == self.sources[s].n_docs:
                    g.epoch, g.pos = g.epoch + 1, 0
            else:
                g.offset += n
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
            s.name: {**c.to_dict(), "fingerprint": s.fingerprint, "n_docs": s.n_docs,
                     "tokenizer": s.meta.get("tokenizer_fingerprint"), "path": s.meta.get("path")}
            for s, c in zip(self.sources, self._cursors)
        }

    def read_positions(self) -> dict[str, ReadPosition]:
        """Per source name, where its reading stands (see ReadPosition)."""
        return read_positions(self.source_cursors())

    def load_source_cursors(self, cursors: dict[str, dict]) -> None:
        """Continue each named source where a previous loader stopped (sources not named start fresh).

        A partially emitted document continues from its offset the next time its source is picked.
        """
        for i, s in enumerate(self.sources):
            d = cursors.get(s.name)
            if d is None:
                continue
            if d["fingerprint"] != s.fingerprint:
                raise ValueError(changed_source_message(s, d))
            self._cursors[i] = SourceCursor.from_dict(d)
        self._orders.clear()
        self._refine()
        self._active = None

    def epochs(self) -> dict[str, int]:
        """Per source the epoch of its least consumed length range."""
        return {s.name: min(g.epoch for g in c.segments) for s, c in zip(self.sources, self._cursors)}

    def bucket_tokens(self) -> dict[str, list[int]]:
        """Tokens emitted per length bucket, for the sources with buckets (this loader's lifetime)."""
        return {s.name: list(b.tokens) for s, b in zip(self.sources, self._bucket_samplers) if b is not None}

    def state_dict(self) -> dict:
        active = None if self._active is None else self._active
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "active": None if active is None else self.sources[active[0]].name,
            # the spilling document's segment (by its lower length bound) and bucket
            "active_segment": None if active is None else self._cursors[active[0]].segments[active[1]].lo,
            "active_bucket": None if active is None else active[2],
            "sources": self.source_cursors(),
            "sampler": self.sampler.state_dict(),
            "buckets": {s.name: b.state_dict() for s, b in zip(self.sources, self._bucket_samplers) if b is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        names = [s.name for s in self.sources]
        if sorted(state["sources"]) != sorted(names):
            raise ValueError(f"loader state is for sources {sorted(state['sources'])}, this loader has {names}")
        self.load_source_cursors(state["sources"])
        self.sampler.load_state_dict(state["sampler"])
        saved_buckets = state.get("buckets", {})
        for s, b in zip(self.sources, self._bucket_samplers):
            if (b is None) != (s.name not in saved_buckets):
                raise ValueError(f"source {s.name!r}: loader state was saved "
                                 f"{'without' if b is not None else 'with'} length buckets; a stage's buckets cannot "
                                 "change on resume (start a new loader and carry source cursors instead)")
            if b is not None:
                b.load_state_dict(saved_buckets[s.name])
        self._active = None
        if state["active"] is not None:
            s = names.index(state["active"])
            lo = state.get("active_segment", 0)
            k = next(k for k, g in enumerate(self._cursors[s].segments) if g.contains(lo))
            self._active = (s, k, int(state.get("active_bucket") or 0))
        self.steps = int(state["steps"])


class BranchLoader(PackedLoader):
    """Reads the same documents as the plain loader would, in another order: in each source's permutation the
    positions consumed before the stage keep their documents, the rest of that epoch (and every later epoch) is
    reshuffled by `branch_seed`. Cursors keep their meaning, so state, resume and hand-over work unchanged. One
    seed branch of a souped stage reads through it (`seeds:` in a stage, midtrain.run.branches)."""

    def __init__(self, sources, weights, *, branch_seed: int, starts: dict[str, tuple[int, int]], **kwargs):
        super().__init__(sources, weights, **kwargs)
        self.branch_seed, self.starts = branch_seed, starts
        self._branch_orders: dict[int, tuple[tuple, object]] = {}

    def permutation(self, source: int, epoch: int):
        base = super().permutation(source, epoch)
        name = self.sources[source].name
        first_epoch, first_pos = self.starts.get(name, (0, 0))
        if epoch < first_epoch:
            return base
        c = self._cursors[source]
        key = (c.seed, c.order, epoch)
        cached = self._branch_orders.get(source)
        if cached is None or cached[0] != key:
            lo = first_pos if epoch == first_epoch else 0
            if c.order == 0:  # cursors saved before orders had versions: the stored shuffle they were read in
                rng = np.random.default_rng([self.branch_seed, zlib.crc32(name.encode()), epoch])
                order = base.copy()
                order[lo:] = base[lo:][rng.permutation(len(base) - lo)]
            else:
                order = ShuffledTail(base, lo, order_key("branch", self.branch_seed, name, epoch))
            cached = (key, order)
            self._branch_orders[source] = cached
        return cached[1]
