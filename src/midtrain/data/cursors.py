"""Where a loader stands in each source, as checkpoints record it: per source a cursor of length segments (each with
its epoch and position in the source's seeded document order), read positions for the document ledger and seed
branches, the furthest of several readers, and why a saved cursor no longer fits a changed source."""

from __future__ import annotations

from dataclasses import dataclass, field

from midtrain.data.tokenize import TokenizedSource

# Document orders: 1 = seeded bijections (data/order.py: no per-document memory); 0 = a stored numpy permutation per
# epoch, what cursors saved before order 1 existed were positions in (they keep reading it, so resume stays exact).
ORDER = 1


@dataclass
class LengthSegment:
    """The documents of one length range [lo, hi) of a source and how far they are consumed: every one in earlier
    epochs, and those at positions < `pos` of `perm(epoch)`; a nonzero `offset` means `perm(epoch)[pos]` is partly
    emitted. Without length buckets a source is one segment [0, inf) and `pos` is the plain cursor."""

    lo: int
    hi: int | None
    epoch: int = 0
    pos: int = 0
    offset: int = 0

    def contains(self, length: int) -> bool:
        return length >= self.lo and (self.hi is None or length < self.hi)


@dataclass
class SourceCursor:
    """Where one source stands: its segments (a partition of document lengths, sorted), each with its own position
    in the source's per-epoch permutation. Length buckets split segments at their bounds; splitting keeps meaning
    (each part inherits the position), so a source read through any buckets repeats and skips nothing."""

    seed: int  # permutation seed; carried across stages so a cursor keeps meaning the same document
    segments: list[LengthSegment] = field(default_factory=lambda: [LengthSegment(0, None)])
    order: int = ORDER  # which kind of document order the positions are in (see ORDER)

    def to_dict(self) -> dict:
        if len(self.segments) == 1:
            g = self.segments[0]
            return {"seed": self.seed, "order": self.order, "epoch": g.epoch, "cursor": g.pos, "offset": g.offset}
        # The legacy fields give the frontier before which every document is consumed (what readers of plain
        # cursors, e.g. the document ledger, can use); `segments` is the exact state.
        epoch, pos = min((g.epoch, g.pos) for g in self.segments)
        return {"seed": self.seed, "order": self.order, "epoch": epoch, "cursor": pos, "offset": 0,
                "segments": [[g.lo, g.hi, g.epoch, g.pos, g.offset] for g in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> SourceCursor:
        order = int(d.get("order", 0))  # saved before orders had versions: the stored permutation
        if "segments" not in d:
            return cls(int(d["seed"]), [LengthSegment(0, None, int(d["epoch"]), int(d["cursor"]), int(d["offset"]))],
                       order)
        segs = [LengthSegment(int(lo), None if hi is None else int(hi), int(e), int(p), int(o))
                for lo, hi, e, p, o in d["segments"]]
        merged = [segs[0]]
        for g in segs[1:]:  # neighbours in the same state are one segment again
            m = merged[-1]
            if (m.epoch, m.pos, m.offset) == (g.epoch, g.pos, g.offset) and not g.offset:
                m.hi = g.hi
            else:
                merged.append(g)
        return cls(int(d["seed"]), merged, order)


@dataclass(frozen=True)
class ReadPosition:
    """Where a source's reading stands in its permutation order: every document before position `pos` of epoch
    `epoch` is consumed, and `offset` tokens of the one at `pos` (with length buckets: the least advanced bucket's
    frontier)."""

    epoch: int
    pos: int
    offset: int
    n_docs: int

    @property
    def index(self) -> int:
        """The position counted over epochs (epoch · n_docs + pos)."""
        return self.epoch * max(1, self.n_docs) + self.pos

    def first_unread(self) -> tuple[int, int]:
        """(epoch, position) of the first document not read at all (a started document counts as read)."""
        epoch, pos = self.epoch, self.pos + (1 if self.offset else 0)
        return (epoch + 1, 0) if pos >= self.n_docs else (epoch, pos)


def read_positions(cursors: dict[str, dict]) -> dict[str, ReadPosition]:
    """`source_cursors()` (as a checkpoint records them) as positions, by source name."""
    return {name: ReadPosition(int(c["epoch"]), int(c["cursor"]), int(c["offset"]), int(c["n_docs"]))
            for name, c in cursors.items()}


def furthest_cursors(cursor_sets: list[dict[str, dict]]) -> dict[str, dict]:
    """Per source the cursor of whichever reader read furthest, moved past a half-read document (in another reader's
    order it would be another document): how several branches' loaders hand over to the next stage."""
    out = {}
    for name in cursor_sets[0]:
        c = dict(max((b[name] for b in cursor_sets), key=lambda d: (d["epoch"], d["cursor"], d["offset"])))
        if c["offset"]:
            c["cursor"], c["offset"] = c["cursor"] + 1, 0
        if c["cursor"] >= c["n_docs"]:
            c["epoch"], c["cursor"] = c["epoch"] + 1, 0
        out[name] = c
    return out


def changed_source_message(source: TokenizedSource, cursor: dict) -> str:
    """Why a saved cursor no longer fits its source, and what to do (a cursor into other documents would repeat or
    skip data)."""
    was, now = cursor.get("tokenizer"), source.meta.get("tokenizer_fingerprint")
    if was and now and was != now:
        what = f"the tokenizer changed since it was saved (tokenizer fingerprint {was[:12]}, now {now[:12]})"
    else:
        what = f"its data {source.meta.get('path') or cursor.get('path') or ''} changed since it was saved"
    return (f"source {source.name!r}: {what.replace('  ', ' ')}; the saved position would point at other documents. "
            "Restore the original, or start a new run_dir (--set run_dir=...); --force-recipe-change cannot help")
