"""Sharded tokenization on the real engines: the shard tasks run as Slurm jobs and as Ray tasks, and the merged cache is
byte for byte the one a single process writes (the oracle of tests/data/test_sharded_tokenize.py)."""

from __future__ import annotations

import pytest

from midtrain.data import byte_tokenizer, tokenize_source
from midtrain.data.sharded_tokenize import tokenize_sharded
from tests.cluster.ray_fixtures import ray_head  # noqa: F401  (fixture)
from tests.data.corpus import prose_texts, random_texts, write_jsonl
from tests.data.test_sharded_tokenize import _assert_same_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-tokenize")
    texts = prose_texts(120) + random_texts(200, seed=5, hi=500)
    write_jsonl(root / "src" / "a.jsonl", texts[:160])
    write_jsonl(root / "src" / "b.jsonl", texts[160:] + texts[:6])  # duplicates across shards
    tok = byte_tokenizer()
    single = tokenize_source("web", root / "src", "text", tok, holdout_docs=5, cache_dir=root / "single")
    return root, tok, single


def _sharded(root, tok, executor: str, **kw):
    done = []
    out = tokenize_sharded("web", root / "src", "text", tok, holdout_docs=5, shards=3, workers=2,
                           cache_dir=root / executor, executor=executor, on_shard=done.append, **kw)
    return out, done


@pytest.mark.slurm
def test_shards_as_slurm_jobs_merge_into_the_single_process_cache(source, slurm_cluster):
    root, tok, single = source
    out, done = _sharded(root, tok, "slurm", slurm={"partition": "debug", "time": "00:10:00", "mem_per_cpu_gb": 1})
    assert len(done) == 3
    _assert_same_cache(single, out)


def test_shards_as_ray_tasks_merge_into_the_single_process_cache(source, ray_head):  # noqa: F811
    root, tok, single = source
    out, done = _sharded(root, tok, "ray")
    assert len(done) == 3
    _assert_same_cache(single, out)
