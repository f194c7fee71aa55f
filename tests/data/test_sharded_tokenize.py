"""Sharded tokenization writes exactly the cache the single-process path writes, resumes by shard, fails cleanly.

Oracle: `tokenize_source` itself (its own tests check it against a one-document-at-a-time reference). Every cache file
must be byte-identical and meta.json equal except `producer`, for sources whose shards split files by line ranges,
hold duplicates of held-out documents in other shards, bad records and decontaminated documents.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import midtrain.data.tokenize as tokenize_mod
from midtrain.data import Decontaminator, InstructionFormat, byte_tokenizer, tokenize_source
from midtrain.data.errors import DataError
from midtrain.data.sharded_tokenize import plan_shards, tokenize_sharded

from .corpus import prose_texts, random_texts, write_jsonl

K = 7  # held-out documents


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


def _lines(texts: list[str]) -> list[str]:
    return [json.dumps({"text": t}) for t in texts]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory source: two plain jsonl files (split by line ranges), a jsonl.gz and a .txt (never split); the
    held-out documents and others repeated in later files; bad records spread through; a benchmark that hits some."""
    root = tmp_path_factory.mktemp("sharded")
    texts = prose_texts(160) + random_texts(260, seed=11, hi=700)
    smallest = sorted(texts, key=_digest)[:K]  # the holdout: its copies elsewhere must be held out with it
    first = _lines(texts[:200])
    for i, bad in enumerate(['{"text": "cut', '{"other": 1}', '{"text": ""}', "[1]", '{"text": 5}']):
        first.insert(35 * i + 4, bad)
    src = root / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(first) + "\n\n")  # a blank line: not a record, still a line
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(_lines(texts[200:260] + smallest[:2])) + "\n")
    (src / "c.jsonl").write_text("\n".join(_lines(texts[260:] + smallest + texts[10:20] + [texts[5]] * 3)) + "\n")
    (src / "d.txt").write_text(texts[0])  # a whole document equal to one before it
    bench = root / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": texts[i]}) + "\n" for i in (3, 150, 300)))
    return src, bench


def _assert_same_cache(a, b) -> None:
    assert a.directory.name == b.directory.name  # the same fingerprint: `midtrain run` finds it
    names = sorted(p.name for p in a.directory.iterdir())
    assert names == sorted(p.name for p in b.directory.iterdir())
    for name in names:
        if name == "meta.json":
            meta_a, meta_b = (json.loads((d / name).read_text()) for d in (a.directory, b.directory))
            assert "producer" in meta_b
            meta_b.pop("producer")
            assert meta_a == meta_b
        else:
            assert filecmp.cmp(a.directory / name, b.directory / name, shallow=False), name


def _single(src, tok, cache, **kw):
    return tokenize_source("s", src, "text", tok, holdout_docs=K, cache_dir=cache, **kw)


@pytest.mark.parametrize("shards", [1, 3, 5])
def test_shards_write_the_single_process_cache(tmp_path, tok, corpus, monkeypatch, shards):
    src, bench = corpus
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 5000)  # many encode batches per shard
    decon = Decontaminator([bench], ngram=8)
    want = _single(src, tok, tmp_path / "one", decontaminator=decon)
    assert want.meta["decontamination"]["dropped"] >= 2 and want.meta["holdout"]["duplicates"] >= 3
    assert want.skips.total >= 5
    plan = plan_shards(src, shards)
    assert len(plan) == shards
    if shards == 5:  # a.jsonl and c.jsonl are cut inside, by line
        assert any(p.start > 0 for pieces in plan for p in pieces)
    done = []
    got = tokenize_sharded("s", src, "text", tok, holdout_docs=K, cache_dir=tmp_path / "many", shards=shards,
                           decontaminator=Decontaminator([bench], ngram=8), on_shard=done.append)
    assert not got.cache_hit and [d.index for d in done] == list(range(shards))
    assert sum(d.documents for d in done) == got.n_docs + want.meta["holdout"]["n_docs"] + \
        want.meta["holdout"]["duplicates"]
    _assert_same_cache(want, got)
    assert not (tmp_path / "many" / "tok-shards" / f"{got.fingerprint}-{shards}").exists()  # work removed
    again = tokenize_sharded("s", src, "text", tok, holdout_docs=K, cache_dir=tmp_path / "many", shards=2,
                             decontaminator=Decontaminator([bench], ngram=8))
    assert again.cache_hit


def test_one_large_file_split_by_line_ranges_with_two_workers(tmp_path, tok, monkeypatch):
    texts = random_texts(600, seed=5, hi=300)
    texts += sorted(texts, key=_digest)[:K] * 2 + texts[:30]  # the held-out documents again, at the end
    path = tmp_path / "big.jsonl"
    lines = _lines(texts)
    lines.insert(321, '{"text": "not json')
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 4000)
    want = _single(path, tok, tmp_path / "one")
    plan = plan_shards(path, 3)
    assert len(plan) == 3 and all(len(pieces) == 1 and pieces[0].unit == str(path) for pieces in plan)
    starts = [pieces[0].start for pieces in plan]
    raw = path.read_bytes()
    assert starts[0] == 0 and all(raw[s - 1 : s] == b"\n" for s in starts[1:])
    assert [p[0].first_line for p in plan] == [raw[:s].count(b"\n") + 1 for s in starts]
    got = tokenize_sharded("s", path, "text", tok, holdout_docs=K, cache_dir=tmp_path / "many", shards=3,
                           workers=2)
    _assert_same_cache(want, got)
    assert want.skips.examples == [f"{path}:322: invalid_json"]


def test_instruction_source(tmp_path, tok):
    rows = [{"prompt": f"question {i}?", "response": f"answer {i % 40}."} for i in range(150)]
    rows[60:60] = [rows[3]] * 2 + [{"prompt": "no answer"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = InstructionFormat(template="simple")
    want = _single(path, tok, tmp_path / "one", instruction=fmt)
    got = tokenize_sharded("s", path, "text", tok, holdout_docs=K, cache_dir=tmp_path / "many", shards=4,
                           instruction=fmt)
    assert (got.directory / "mask.bin").is_file()
    _assert_same_cache(want, got)


def test_rerun_tokenizes_only_the_shard_whose_output_is_gone(tmp_path, tok, corpus):
    src, _ = corpus
    cache = tmp_path / "c"
    first = tokenize_sharded("s", src, "text", tok, holdout_docs=K, cache_dir=cache, shards=4, keep_work=True)
    work = cache / "tok-shards" / f"{first.fingerprint}-4"
    marker = lambda i: work / f"shard-{i:05d}" / "DONE"  # noqa: E731
    before = {i: marker(i).stat().st_mtime_ns for i in range(4)}
    shutil.rmtree(first.directory)  # a cold cache again, and one shard lost (e.g. a task killed mid-write)
    shutil.rmtree(work / "shard-00002")
    done = []
    second = tokenize_sharded("s", src, "text", tok, holdout_docs=K, cache_dir=cache, shards=4, on_shard=done.append,
                              keep_work=True)
    assert sorted((d.index, d.reused) for d in done) == [(0, True), (1, True), (2, False), (3, True)]
    assert [marker(i).stat().st_mtime_ns == before[i] for i in range(4)] == [True, True, False, True]
    assert not second.cache_hit
    _assert_same_cache(_single(src, tok, tmp_path / "one"), second)


def test_a_failed_shard_names_the_file_and_leaves_no_cache(tmp_path, tok):
    src = tmp_path / "src"
    write_jsonl(src / "a.jsonl", random_texts(50, seed=1))
    good = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in random_texts(50, seed=2)).encode())
    (src / "b.jsonl.gz").write_bytes(good[: len(good) // 2])  # truncated: unreadable past the middle
    write_jsonl(src / "c.jsonl", random_texts(50, seed=3))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"source 's': a tokenization task failed: .*b\.jsonl\.gz:\d+: cannot read"):
        tokenize_sharded("s", src, "text", tok, holdout_docs=2, cache_dir=cache, shards=3, workers=2)
    assert not (cache / "tok").exists() or not list((cache / "tok").iterdir())  # no cache, no temp dir


def test_cli_tokenize_then_the_run_finds_the_cache_warm(tmp_path, monkeypatch):
    from midtrain.cli import app
    from midtrain.config import load_recipe
    from midtrain.data.prepare import apply_special_tokens, tokenize_recipe_sources

    write_jsonl(tmp_path / "web" / "a.jsonl", random_texts(120, seed=1, hi=500))
    write_jsonl(tmp_path / "web" / "b.jsonl", prose_texts(80))
    write_jsonl(tmp_path / "code.jsonl", random_texts(90, seed=2))
    tokens = np.concatenate([np.r_[np.arange(1, 40 + i), 257] for i in range(30)]).astype(np.uint16)
    (tmp_path / "pre").mkdir()
    tokens.tofile(tmp_path / "pre" / "part-0.npy")
    stage = ("{name: one, tokens: 4096, seq_len: 128, batch: {tokens: 1024}, schedule: {kind: constant, "
             "peak_lr: 1e-3}, data: {mixture: {web: 0.4, code: 0.3, pre: 0.3}}}")
    (tmp_path / "r.yaml").write_text(
        "base: preset:tiny-llama\ntokenizer: bytes\nsources:\n  - {name: web, path: web, holdout_docs: 4}\n"
        "  - {name: code, path: code.jsonl, holdout_docs: 2}\n"
        "  - {name: pre, path: pre, format: numpy, dtype: uint16, holdout_docs: 2}\n"
        f"stages:\n  - {stage}\n")
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["data", "tokenize", str(tmp_path / "r.yaml"), "--shards", "3",
                                      "--workers", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "web: shard 3/3:" in out and "code: shard 1/3:" in out
    assert "pre: pre-tokenized" in out and "total:" in out and "tokens/s" in out
    recipe = load_recipe(tmp_path / "r.yaml")
    from midtrain.run import resolve_tokenizer

    tokenizer = resolve_tokenizer(recipe)
    apply_special_tokens(recipe, tokenizer)
    sources = tokenize_recipe_sources(recipe, tokenizer)  # what `midtrain run` calls (run/setup.py)
    by_name = {s.name: s for s in sources}
    assert by_name["web"].cache_hit and by_name["code"].cache_hit
    assert f"{by_name['web'].directory}" in out
    again = CliRunner().invoke(app, ["data", "tokenize", str(tmp_path / "r.yaml")], terminal_width=200)
    assert again.exit_code == 0 and "web: cached already" in again.output, again.output


def test_skip_examples_keep_the_single_process_order(tmp_path, monkeypatch):
    """Records skipped while reading and documents found empty after encoding (written a few batches later) are
    reported in the order one process meets them, whichever shards they fall in (within a shard its own order is
    that order already; across a shard boundary the merge must interleave them)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(range(33, 127))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.normalizer = normalizers.Replace("q", "")  # "qqq" is a document without tokens (and no BOS/EOS to add)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    lines = _lines([f"doc {i} " + "abcdefgh" * (i % 7 + 1) for i in range(160)])
    for i in range(64, 100, 3):  # around the middle, where the shards meet: the order across them matters
        lines.insert(i, json.dumps({"text": "qqq"}) if i % 2 else '{"text": 3}')
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 120)
    want = _single(path, tok, tmp_path / "one")
    kinds = [e.rsplit(": ", 1)[1] for e in want.skips.examples]
    assert "no_tokens" in kinds and "not_string" in kinds and kinds != sorted(kinds, key=kinds.index)
    for shards in (2, 5):
        got = tokenize_sharded("s", path, "text", tok, holdout_docs=K, cache_dir=tmp_path / f"c{shards}",
                               shards=shards)
        _assert_same_cache(want, got)
