from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from midtrain.data import PackedLoader

from .corpus import source_streams

SEQ, ROWS = 128, 8


def make(sources, weights=(0.5, 0.3, 0.2), **kw) -> PackedLoader:
    args = dict(seq_len=SEQ, global_batch_seqs=ROWS, seed=0) | kw
    return PackedLoader(sources, list(weights), **args)


def run(loader: PackedLoader, steps: int) -> list[dict[str, torch.Tensor]]:
    return [mb for _ in range(steps) for mb in loader.next_step()]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def expected_stream(loader: PackedLoader, s: int, n_tokens: int) -> np.ndarray:
    """Oracle: source `s`'s documents in permutation order, epoch after epoch, truncated to n_tokens."""
    src, out, epoch = loader.sources[s], [], 0
    while sum(map(len, out)) < n_tokens:
        perm = loader.permutation(s, epoch)
        assert np.array_equal(np.sort(perm), np.arange(src.n_docs))  # each document once per epoch
        out += [src.doc(i) for i in perm]
        epoch += 1
    return np.concatenate(out)[:n_tokens].astype(np.int64)


def test_batch_contract(sources):
    loader = make(sources, micro_batch=4)
    for _ in range(3):
        mbs = loader.next_step()
        assert len(mbs) == 2
        for mb in mbs:
            assert set(mb) == {"input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", "source_ids"}
            for k in ("input_ids", "labels", "position_ids", "source_ids"):
                assert mb[k].shape == (4, SEQ) and mb[k].dtype == torch.int64, k
            assert mb["cu_seqlens"].dtype == torch.int32 and mb["max_seqlen"].dtype == torch.int64
            assert mb["max_seqlen"].dim() == 0
            ids, labels, pos, src = (mb[k].numpy() for k in ("input_ids", "labels", "position_ids", "source_ids"))
            starts = pos == 0
            assert starts[:, 0].all()  # every row starts a segment
            assert (labels[starts] == -100).all() and np.array_equal(labels[~starts], ids[~starts])
            assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()  # +1 within a segment
            flat_starts = np.flatnonzero(starts.ravel())
            cu = mb["cu_seqlens"].numpy()
            assert np.array_equal(cu, np.append(flat_starts, ids.size))
            assert int(mb["max_seqlen"]) == np.diff(cu).max()
            for a, b in zip(cu[:-1], cu[1:]):  # one source per segment
                seg = src.ravel()[a:b]
                assert (seg == seg[0]).all() and 0 <= seg[0] < len(sources)
            # a segment starting mid-row starts a document with <|bos|>; a row-start segment may be a continuation
            mid = starts.copy()
            mid[:, 0] = False
            assert (ids[mid] == 256).all()


def test_emitted_tokens_reconstruct_documents(sources):
    loader = make(sources)
    batches = run(loader, 40)
    total = 0
    for s, stream in enumerate(source_streams(batches, len(sources))):
        assert np.array_equal(stream, expected_stream(loader, s, len(stream)))
        total += len(stream)
    assert total == 40 * ROWS * SEQ  # no padding anywhere
    # the sampler is charged for tokens actually emitted, so a document cut at a step boundary counts only its part
    assert loader.sampler.tokens == [len(x) for x in source_streams(batches, len(sources))]
    assert loader.epochs()["tiny"] >= 2  # the tiny source wrapped around and was re-permuted
    tiny = sources[2]
    assert not np.array_equal(loader.permutation(2, 0), loader.permutation(2, 1))
    first_epoch = source_streams(batches, 3)[2][: tiny.n_tokens]
    docs = np.split(first_epoch, np.flatnonzero(first_epoch == 256)[1:])
    assert sorted(map(tuple, docs)) == sorted(tuple(tiny.doc(i).astype(np.int64)) for i in range(tiny.n_docs))


def test_single_source_realizes_one_document_order(sources):
    loader = make(sources[:1], weights=[1], seq_len=64)
    stream = source_streams(run(loader, 30), 1)[0]
    assert np.array_equal(stream, expected_stream(loader, 0, len(stream)))


@pytest.mark.parametrize("k", [1, 7])
def test_resume_is_exact(sources, k):
    straight = make(sources, micro_batch=2)
    run(straight, k)
    expected = run(straight, 5)

    first = make(sources, micro_batch=2)
    run(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = make(sources, micro_batch=2)
    resumed.load_state_dict(state)
    assert_same(run(resumed, 5), expected)
    assert resumed.state_dict() == straight.state_dict()


def test_world_size_shards_the_same_global_batch(sources):
    single = make(sources)
    ranks = [make(sources, rank=r, world_size=2, micro_batch=2) for r in range(2)]
    for _ in range(4):
        (glob,) = single.next_step()
        parts = [r.next_step() for r in ranks]
        rows = [torch.cat([mb["input_ids"] for mb in p]) for p in parts]
        assert all(len(r) == ROWS // 2 for r in rows)
        assert torch.equal(torch.cat(rows), glob["input_ids"])
        srcs = torch.cat([mb["source_ids"] for p in parts for mb in p])
        assert torch.equal(srcs, glob["source_ids"])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resume_on_a_different_world_size(sources):
    single = make(sources)
    run(single, 3)
    state = single.state_dict()
    (glob,) = single.next_step()
    halves = []
    for r in range(2):
        loader = make(sources, rank=r, world_size=2)
        loader.load_state_dict(state)
        halves.append(loader.next_step()[0]["input_ids"])
    assert torch.equal(torch.cat(halves), glob["input_ids"])


def test_source_cursors_carry_into_a_new_mixture(sources):
    stage1 = make(sources, weights=[0.6, 0.3, 0.1])
    b1 = run(stage1, 9)
    cursors = json.loads(json.dumps(stage1.source_cursors()))
    assert any(c["offset"] > 0 for c in cursors.values())  # the hand-off happens mid-document
    stage2 = make(sources, weights=[0.1, 0.2, 0.7], seed=123, seq_len=96)  # new mixture, seed and length
    stage2.load_source_cursors(cursors)
    b2 = run(stage2, 9)
    for s, (x, y) in enumerate(zip(source_streams(b1, 3), source_streams(b2, 3))):
        both = np.concatenate([x, y])
        oracle = expected_stream(stage1, s, len(both))
        assert np.array_equal(both, oracle)  # continues exactly: 0 documents repeated, 0 skipped
        # the same claim counted in documents (first epoch only: later epochs repeat by design)
        n = min(len(both), sources[s].n_tokens)
        docs = [tuple(d) for d in np.split(both[:n], np.flatnonzero(both[:n] == 256)[1:])]
        full = {tuple(sources[s].doc(i).astype(np.int64)) for i in range(sources[s].n_docs)}
        complete = docs[:-1]  # the last one may be cut by the end of the run
        assert len(set(complete)) == len(complete) and set(complete) <= full
        if s == 2:
            assert set(complete) | {docs[-1]} == full  # tiny: the whole first epoch, each document once
    assert stage2.epochs()["prose"] == 0


def test_partial_document_continues_in_next_stage(sources):
    stage1 = make(sources[:1], weights=[1], seq_len=100, global_batch_seqs=1)
    first = run(stage1, 1)[0]
    cur = stage1.source_cursors()["prose"]
    assert cur["offset"] > 0  # prose paragraphs are longer than 100 bytes: this row ended mid-document
    stage2 = make(sources[:1], weights=[1], seq_len=100, global_batch_seqs=1)
    stage2.load_source_cursors({"prose": cur})
    second = run(stage2, 1)[0]
    assert second["position_ids"][0, 0] == 0 and second["labels"][0, 0] == -100
    assert second["input_ids"][0, 0] != 256  # a continuation, not a new document
    stream = np.concatenate([first["input_ids"].numpy().ravel(), second["input_ids"].numpy().ravel()])
    assert np.array_equal(stream, expected_stream(stage1, 0, 200))


def test_cursor_for_changed_data_is_rejected(sources):
    cursors = make(sources).source_cursors()
    cursors["prose"]["fingerprint"] = "0" * 64
    with pytest.raises(ValueError, match="prose"):
        make(sources).load_source_cursors(cursors)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(global_batch_seqs=10, world_size=3), "global_batch_seqs=10 is not divisible by world_size=3"),
        (dict(global_batch_seqs=8, world_size=2, micro_batch=3), r"8/2 = 4.*micro_batch=3"),
        (dict(rank=2, world_size=2), "rank=2"),
        (dict(seq_len=0), "seq_len=0"),
    ],
)
def test_bad_geometry_is_rejected(sources, kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(sources, **kw)


def test_weights_must_match_sources(sources):
    with pytest.raises(ValueError, match="2 weights for 3 sources"):
        make(sources, weights=[0.5, 0.5])


def test_realized_token_shares_follow_weights(sources):
    weights = [0.55, 0.4, 0.05]
    loader = make(sources, weights=weights)
    src = torch.cat([mb["source_ids"].ravel() for mb in run(loader, 60)])
    shares = torch.bincount(src, minlength=3).double() / src.numel()
    assert torch.allclose(shares, torch.tensor(weights, dtype=torch.float64), atol=0.005)


def test_unsplit_documents_stay_whole_and_padding_carries_no_loss(sources):
    loader = make(sources, split_documents=False)
    batches = run(loader, 20)
    segments: list[list[int]] = [[] for _ in sources]  # per source: segment lengths in emission order
    for b in batches:
        pad = b["source_ids"] == -1
        assert torch.all(b["labels"][pad] == -100) and torch.all(b["input_ids"][pad] == 0)
        for r in range(b["source_ids"].shape[0]):
            starts = torch.nonzero(b["position_ids"][r] == 0).flatten().tolist() + [SEQ]
            for a, z in zip(starts, starts[1:]):
                src = int(b["source_ids"][r, a])
                if src == -1:
                    assert z == SEQ  # padding only closes a row
                else:
                    segments[src].append(z - a)
    assert any(torch.any(b["source_ids"] == -1) for b in batches)  # some documents did not fit a row's rest
    for s, lengths in enumerate(segments):
        # Oracle: walk the source's documents in order; one that fits a row is exactly one segment.
        docs = [len(loader.sources[s].doc(i)) for e in range(loader.epochs()[loader.sources[s].name] + 1)
                for i in loader.permutation(s, e)]
        k = 0
        for doc_len in docs:
            if k == len(lengths):
                break
            if doc_len <= SEQ:
                assert lengths[k] == doc_len, (s, k)
                k += 1
            else:
                left = doc_len
                while left and k < len(lengths):
                    left -= lengths[k]
                    k += 1
                assert left >= 0
        assert k == len(lengths)
    for s, stream in enumerate(source_streams(batches, len(sources))):  # same token order, padding aside
        assert np.array_equal(stream, expected_stream(loader, s, len(stream)))

    straight = make(sources, split_documents=False)
    run(straight, 7)
    resumed = make(sources, split_documents=False)
    resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    assert_same(run(resumed, 3), run(straight, 3))


def test_cursors_saved_before_orders_had_versions_keep_reading_numpy_permutation(sources):
    """Old checkpoints hold positions in `Generator.permutation` order (no "order" key): they resume in that order,
    recomputed here from its documented seeding, so an upgrade neither repeats nor skips documents."""
    import hashlib

    src = sources[0]
    saved = PackedLoader([src], [1.0], seq_len=SEQ, global_batch_seqs=ROWS, seed=7).state_dict()
    cursor = saved["sources"][src.name]
    assert cursor.pop("order") == 1
    cursor["cursor"] = 5
    loader = PackedLoader([src], [1.0], seq_len=SEQ, global_batch_seqs=ROWS, seed=7)
    loader.load_state_dict(json.loads(json.dumps(saved)))
    key = int.from_bytes(hashlib.sha256(src.name.encode()).digest()[:8], "big")
    legacy = np.random.default_rng([7, key, 0]).permutation(src.n_docs)
    stream = source_streams(run(loader, 2), 1)[0]
    want = np.concatenate([src.doc(int(d)) for d in legacy[5:]])[: len(stream)]
    assert np.array_equal(stream, want.astype(np.int64))
    assert loader.state_dict()["sources"][src.name]["order"] == 0  # and it keeps saying so
