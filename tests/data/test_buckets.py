"""Length buckets and long-document upsampling: realized token shares, exact resume, no repeats or skips.

Oracle: each document starts with "#<id>#", so the emitted token stream of a source (in emission order) splits at
BOS into documents whose id, and so whose full length and bucket, is known from the corpus; pieces continuing a
document at the start of a row carry no BOS and belong to the document before them.
"""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
from typer.testing import CliRunner

from midtrain.config.recipe import DataConfig
from midtrain.data import PackedLoader, byte_tokenizer, tokenize_source
from midtrain.data.mixture import bucket_of, source_buckets

from .corpus import source_streams, write_jsonl

BOS = 256
SHORT, LONG = (20, 300), (500, 1400)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lo, hi = SHORT if i % 3 else LONG  # a third long documents
        body = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(lo, hi)))
        out.append(f"#{i}#{body}")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    tok = byte_tokenizer()
    a_texts, b_texts = _texts(240, 1), _texts(150, 2)
    a = tokenize_source("a", write_jsonl(root / "a.jsonl", a_texts), "text", tok, holdout_docs=0, cache_dir=root)
    b = tokenize_source("b", write_jsonl(root / "b.jsonl", b_texts), "text", tok, holdout_docs=0, cache_dir=root)
    lengths = [{i: len(t.encode()) + 2 for i, t in enumerate(texts)} for texts in (a_texts, b_texts)]  # + BOS/EOS
    return a, b, lengths


def _documents(stream: np.ndarray) -> list[tuple[int, int]]:
    """(document id, tokens of it in this stream) in emission order; a leading continuation has id -1."""
    starts = np.flatnonzero(stream == BOS)
    out = [(-1, int(starts[0]) if len(starts) else len(stream))] if not len(starts) or starts[0] else []
    bounds = list(starts) + [len(stream)]
    for s, e in zip(bounds, bounds[1:]):
        head = bytes(stream[s + 1 : s + 12].astype(np.uint8).tolist()).decode("latin-1")
        found = re.match(r"#(\d+)#", head)
        if found is None and e == len(stream):
            break  # the stream ends inside the document's id
        out.append((int(found.group(1)), int(e - s)))
    return out


def _run(loader: PackedLoader, steps: int) -> list[dict]:
    return [mb for _ in range(steps) for mb in loader.next_step()]


def _bucket_shares(stream, lengths: dict[int, int], buckets) -> list[float]:
    tokens = np.zeros(len(buckets))
    for doc, n in _documents(stream):
        tokens[bucket_of([lengths[doc]], buckets)[0]] += n
    return list(tokens / tokens.sum())


def test_realized_bucket_and_source_shares_match_the_plan(corpus):
    a, b, lengths = corpus
    buckets_a = [(0, 400, 0.55), (400, None, 0.45)]  # the natural share of long tokens is about 0.74
    natural = sum(n for n in lengths[0].values() if n >= 400) / sum(lengths[0].values())
    assert natural - 0.45 > 0.2
    buckets_b = [(0, 400, 0.5), (400, 2000, 0.5)]
    loader = PackedLoader([a, b], [0.7, 0.3], seq_len=256, global_batch_seqs=8, seed=5,
                          length_buckets=[buckets_a, buckets_b])
    batches = _run(loader, 300)  # 614K tokens
    streams = source_streams(batches, 2)
    total = sum(len(s) for s in streams)
    assert abs(len(streams[0]) / total - 0.7) < 0.005
    for stream, lens, buckets in ((streams[0], lengths[0], buckets_a), (streams[1], lengths[1], buckets_b)):
        realized = _bucket_shares(stream, lens, buckets)
        for (_, _, plan), got in zip(buckets, realized):
            assert abs(got - plan) < 0.005, (realized, buckets)
    assert loader.bucket_tokens()["a"][1] / sum(loader.bucket_tokens()["a"]) == pytest.approx(
        _bucket_shares(streams[0], lengths[0], buckets_a)[1], abs=1e-9)


def test_documents_outside_every_bucket_are_not_drawn_and_buckets_repeat_epoch_by_epoch(corpus):
    a, _, lengths = corpus
    loader = PackedLoader([a], [1.0], seq_len=256, global_batch_seqs=8, seed=1, length_buckets=[[(400, None, 1.0)]])
    stream = source_streams(_run(loader, 60), 1)[0]
    counts: dict[int, int] = {}
    for doc, _ in _documents(stream):
        counts[doc] = counts.get(doc, 0) + 1
    long_docs = [d for d, n in lengths[0].items() if n >= 400]
    assert set(counts) <= set(long_docs)
    assert max(counts.values()) >= 2  # more than one epoch of the long documents...
    assert max(counts.values()) - min(counts.get(d, 0) for d in long_docs) <= 1  # ...each one epoch at a time


def test_exact_resume_mid_stage_with_buckets(corpus):
    a, b, _ = corpus
    kwargs = dict(seq_len=128, global_batch_seqs=4, seed=3, length_buckets=[[(0, 400, 0.4), (400, None, 0.6)], None])
    straight = _run(PackedLoader([a, b], [0.5, 0.5], **kwargs), 40)
    first = PackedLoader([a, b], [0.5, 0.5], **kwargs)
    head = _run(first, 17)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PackedLoader([a, b], [0.5, 0.5], **kwargs)
    resumed.load_state_dict(state)
    tail = _run(resumed, 23)
    assert len(head + tail) == len(straight)
    for x, y in zip(head + tail, straight):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)
    other = PackedLoader([a, b], [0.5, 0.5], **{**kwargs, "length_buckets": [[(0, 400, 0.5), (400, None, 0.5)],
                                                                              None]})
    with pytest.raises(ValueError, match="weights"):
        other.load_state_dict(state)  # the buckets' shares changed: a clear error, not silently other data
    plain = PackedLoader([a, b], [0.5, 0.5], **{**kwargs, "length_buckets": None})
    with pytest.raises(ValueError, match="with length buckets"):
        plain.load_state_dict(state)


def test_stage_change_after_buckets_repeats_and_skips_nothing(corpus):
    """Stage 1 reads only long documents (>1 epoch of them); stage 2 reads the whole source: the lagging short
    documents come first and every document ends within one use of every other (no repeat, no skip)."""
    a, _, lengths = corpus
    one = PackedLoader([a], [1.0], seq_len=256, global_batch_seqs=8, seed=2, length_buckets=[[(400, None, 1.0)]])
    s1 = source_streams(_run(one, 25), 1)[0]
    cursors = json.loads(json.dumps(one.source_cursors()))
    assert "segments" in cursors["a"]
    two = PackedLoader([a], [1.0], seq_len=256, global_batch_seqs=8, seed=2)
    two.load_source_cursors(cursors)
    s2 = source_streams(_run(two, 60), 1)[0]
    counts = dict.fromkeys(lengths[0], 0)
    for doc, _ in _documents(np.concatenate([s1, s2])):
        counts[doc] += 1  # a document cut at the stage boundary continues without a second BOS
    assert min(counts.values()) >= 1 and max(counts.values()) - min(counts.values()) <= 1
    first_of_stage_2 = [d for d, _ in _documents(s2)[1:20]]
    assert all(lengths[0][d] < 400 for d in first_of_stage_2)
    # and back: the exact state survives a round trip through a loader without buckets
    three = PackedLoader([a], [1.0], seq_len=256, global_batch_seqs=8, seed=2, length_buckets=[[(0, 400, 1.0)]])
    three.load_source_cursors(json.loads(json.dumps(two.source_cursors())))
    s3 = source_streams(_run(three, 10), 1)[0]
    for doc, _ in _documents(np.concatenate([s1, s2, s3])[len(s1) + len(s2):]):
        assert doc == -1 or lengths[0][doc] < 400


def test_a_bucket_without_documents_is_an_error(corpus):
    a, _, _ = corpus
    with pytest.raises(ValueError, match=r"source 'a': no document of 5000 <= tokens < inf"):
        PackedLoader([a], [1.0], seq_len=64, global_batch_seqs=2, seed=0,
                     length_buckets=[[(0, 5000, 0.5), (5000, None, 0.5)]])


def test_upsample_long_keeps_the_domain_mix_and_sets_the_long_share(corpus):
    a, _, lengths = corpus
    p = sum(n for n in lengths[0].values() if n >= 400) / sum(lengths[0].values())
    data = DataConfig(mixture={"a": 1}, upsample_long={"min_tokens": 400, "factor": 3})
    [(lo0, hi0, short), (lo1, hi1, long)] = source_buckets(data, a)
    assert (lo0, hi0, lo1, hi1) == (0, 400, 400, None)
    assert long == pytest.approx(3 * p / (3 * p + 1 - p)) and short == pytest.approx(1 - long)
    assert source_buckets(DataConfig(mixture={"a": 1}, upsample_long={"min_tokens": 400, "share": 0.9}), a)[1][2] \
        == 0.9
    assert source_buckets(DataConfig(mixture={"a": 1}, upsample_long={"min_tokens": 10**6, "factor": 3}), a) is None
    per_source = DataConfig(mixture={"a": 1}, upsample_long={"min_tokens": 400, "factor": 3},
                            source_length_buckets={"a": [{"min": 100, "share": 1}]})
    assert source_buckets(per_source, a) == [(100, None, 1.0)]
    assert source_buckets(per_source, SimpleNamespace(name="b", offsets=a.offsets))[1][2] == pytest.approx(long)


@pytest.mark.parametrize("data, message", [
    ({"length_buckets": [{"min": 0, "max": 100, "share": 0.5}, {"min": 50, "share": 0.5}]},
     r"buckets \[0, 100\) and \[50, inf\) overlap"),
    ({"length_buckets": [{"max": 100, "share": 0.5}, {"min": 100, "share": 0.4}]}, "shares must sum to 1, got 0.9"),
    ({"length_buckets": [{"min": "16K", "max": "4K", "share": 1}]}, r"max \(4000\) must exceed min \(16000\)"),
    ({"upsample_long": {"min_tokens": "4K"}}, "exactly one of factor or share"),
    ({"upsample_long": {"min_tokens": "4K", "factor": 2}, "length_buckets": [{"share": 1}]},
     "either length_buckets or upsample_long"),
    ({"source_length_buckets": {"code": [{"share": 0.3}]}}, "code: bucket shares must sum to 1"),
])
def test_recipe_validation_messages(data, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(mixture={"a": 1}, **data)


def test_inspect_prints_the_planned_bucket_shares(tmp_path, monkeypatch):
    from midtrain.cli import app

    write_jsonl(tmp_path / "a.jsonl", _texts(90, 4))
    write_jsonl(tmp_path / "b.jsonl", _texts(60, 5))
    stage = ("{name: long, tokens: 40960, seq_len: 256, batch: {tokens: 2048}, schedule: {kind: constant, "
             "peak_lr: 1e-3}, data: {mixture: {a: 0.5, b: 0.5}, length_buckets: [{min: 400, share: 0.75}, "
             "{min: 0, max: 400, share: 0.25}], source_length_buckets: {b: [{min: 0, share: 1}]}}}")
    (tmp_path / "r.yaml").write_text(
        "base: preset:tiny-llama\ntokenizer: bytes\nsources:\n  - {name: a, path: a.jsonl, holdout_docs: 0}\n"
        f"  - {{name: b, path: b.jsonl, holdout_docs: 0}}\nstages:\n  - {stage}\n")
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "r.yaml")], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "│ long" in line and "[" in line]
    assert len(rows) == 3, result.output
    a_long = next(r for r in rows if "│ a " in r and "[400, inf)" in r)
    assert "75.0%" in a_long and "37.5%" in a_long and "15,360" in a_long  # 40960 * 0.5 * 0.75
    assert any("│ b " in r and "[0, inf)" in r and "100.0%" in r for r in rows)


def _bucket_recipe(tmp_path, data: str, extra_stage: str = "", max_epochs: str = "null"):
    from midtrain.config import load_recipe

    write_jsonl(tmp_path / "a.jsonl", _texts(90, 4))
    stage = ("{{name: {name}, tokens: 40960, seq_len: 256, batch: {{tokens: 2048}}, schedule: {{kind: constant, "
             "peak_lr: 1e-3}}, data: {data}{extra}}}")
    (tmp_path / "r.yaml").write_text(
        "base: preset:tiny-llama\ntokenizer: bytes\n"
        f"sources:\n  - {{name: a, path: a.jsonl, holdout_docs: 0, max_epochs: {max_epochs}}}\nstages:\n"
        f"  - {stage.format(name='one', data='{mixture: {a: 1}}', extra='')}\n"
        f"  - {stage.format(name='two', data=data, extra=extra_stage)}\n")
    return load_recipe(tmp_path / "r.yaml")


def test_run_checks_refuse_empty_buckets_and_buckets_beyond_their_cap(tmp_path):
    from midtrain.data.prepare import check_epoch_caps, tokenize_recipe_sources

    recipe = _bucket_recipe(tmp_path, "{mixture: {a: 1}, length_buckets: [{max: 5000, share: 0.5}, "
                                      "{min: 5000, share: 0.5}]}")
    sources = tokenize_recipe_sources(recipe, byte_tokenizer(), cache_dir=tmp_path / "c")
    assert check_epoch_caps(recipe, sources) == [
        "stage 'two': source 'a' has no documents of [5,000, inf) tokens for its length bucket (share 0.5)"]
    capped = _bucket_recipe(tmp_path, "{mixture: {a: 1}, upsample_long: {min_tokens: 400, share: 0.9}}",
                            max_epochs="2.2")
    [problem] = check_epoch_caps(capped, tokenize_recipe_sources(capped, byte_tokenizer(), cache_dir=tmp_path / "c"))
    assert problem.startswith("source 'a': its documents of [400, inf) tokens reach") and "max_epochs=2.2" in problem


def test_seed_branches_with_buckets_are_a_recipe_error(tmp_path):
    from midtrain.config.checks import recipe_problems

    recipe = _bucket_recipe(tmp_path, "{mixture: {a: 1}, upsample_long: {min_tokens: 400, factor: 2}}")
    stages = [recipe.stages[0], recipe.stages[1].model_copy(update={"seeds": [1, 2]})]
    problems = recipe_problems(recipe.model_copy(update={"stages": stages}))
    message = "seed branches do not support length buckets / upsample_long (in this or an earlier stage) yet"
    assert (("stages", 1, "seeds"), message) in problems
    buckets_first = [recipe.stages[1].model_copy(update={"name": "zero"}), *stages]
    problems = recipe_problems(recipe.model_copy(update={"stages": buckets_first}))
    assert (("stages", 2, "seeds"), message) in problems  # cursors stay segmented after a bucketed stage
