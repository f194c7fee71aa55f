"""`midtrain data curate` on a real Ray cluster (a local head, tests/cluster/ray_fixtures.py) against the local executor.

The same recipe and corpus are curated with `executor: local` and `executor: ray` (2 tasks per job, so the Ray tasks
really are split): the curated files must be the same files with the same documents in the same order (compared
decompressed: gzip headers carry a timestamp). Then: a re-submission runs only tasks without a completion marker, and
a corrupt input file fails with an error naming the file and the task's log, leaving no `_SUCCESS` behind.

Run locally: `pip install -c constraints.txt -e '.[dev,cluster]'` then `pytest tests/cluster/test_ray_curate.py`
(about a minute on 2 cores: every Ray task is a fresh worker process that imports datatrove and spaCy).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tests.cluster.curation import JOBS, contents, curate_cli, curated, work, write_corpus, write_recipe
from tests.cluster.ray_fixtures import ray_head  # noqa: F401  (fixture)

pytest.importorskip("datatrove")
pytest.importorskip("spacy")
pytestmark = [
    pytest.mark.slow,
    # datatrove 0.10 passes placement groups the pre-2.x way; Ray warns once per task
    pytest.mark.filterwarnings("ignore:placement_group:DeprecationWarning"),
]

def _recipe(root: Path, executor: str, data: Path) -> Path:
    return write_recipe(root, executor, data)


def task_logs(recipe: Path) -> dict[str, int]:
    """mtime of every task log, by "job/task_XXXXX.log": a task that runs again rewrites its log."""
    logs = work(recipe) / "logs"
    return {f"{f.parent.parent.name}/{f.name}": f.stat().st_mtime_ns for f in logs.glob("*/logs/task_*.log")}


@pytest.fixture(scope="module")
def both(tmp_path_factory, ray_head):  # noqa: F811
    """The same corpus curated by the local executor and on Ray (one Ray run shared by the tests below)."""
    root = tmp_path_factory.mktemp("ray-curate")
    data = write_corpus(root / "web")
    recipes = {ex: _recipe(root, ex, data) for ex in ("local", "ray")}
    for ex, recipe in recipes.items():
        result = curate_cli(recipe)
        assert result.exit_code == 0, f"{ex}: {result.output}"
    return recipes


def test_ray_curation_writes_exactly_the_local_output(both):
    assert (curated(both["ray"]) / "_SUCCESS").is_file() and (curated(both["local"]) / "_SUCCESS").is_file()
    got, want = contents(both["ray"]), contents(both["local"])
    assert sorted(got) == sorted(want) == ["00000.jsonl.gz", "00001.jsonl.gz"]  # one file per task
    assert got == want
    assert sum(text.count(b"\n") for text in got.values()) == 12  # dedup really ran: 18 in, 12 kept
    for job in JOBS:  # every job of the chain ran as Ray tasks and marked each of them complete
        tasks = {"exact-find": 1, "minhash-cluster": 1, "finish": 1}.get(job, 2)
        assert len(list((work(both["ray"]) / "logs" / job / "completions").iterdir())) == tasks, job


def test_ray_curation_summary_matches_local(both):
    import json

    def steps(recipe):
        summary = recipe.parent / f"run-{recipe.stem}" / "data" / "curation" / "web.json"
        return json.loads(summary.read_text())["steps"]

    assert steps(both["ray"]) == steps(both["local"])


def test_resubmission_runs_only_incomplete_tasks(both):
    ray = both["ray"]
    want, before = contents(ray), task_logs(ray)
    # Nothing incomplete: no task runs again.
    assert curate_cli(ray).exit_code == 0
    assert task_logs(ray) == before
    # Lose one task of the last data job (its marker and its output) and the chain's end: only those two run again.
    logs = work(ray) / "logs"
    (logs / "minhash-filter" / "completions" / "00001").unlink()
    (curated(ray) / "output" / "00001.jsonl.gz").unlink()
    (logs / "finish" / "completions" / "00000").unlink()
    (curated(ray) / "_SUCCESS").unlink()
    result = curate_cli(ray)
    assert result.exit_code == 0, result.output
    after = task_logs(ray)
    rerun = sorted(k for k in after if after[k] != before[k])
    assert rerun == ["finish/task_00000.log", "minhash-filter/task_00001.log"]
    assert contents(ray) == want and (curated(ray) / "_SUCCESS").is_file()


def test_corrupt_input_fails_naming_file_and_task_log(tmp_path, both):
    from midtrain.config import load_recipe
    from midtrain.data.errors import DataError
    from midtrain.data.prepare import source_input

    data = write_corpus(tmp_path / "web")
    bad = data / "zz-bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"body": "fine"}\n' * 50)[:-30])  # truncated: fails mid-file
    recipe = _recipe(tmp_path, "ray", data)
    result = curate_cli(recipe)
    assert result.exit_code != 0
    message = " ".join(result.output.split())  # rich wraps long lines
    assert str(bad) in message and "curation job 'filter' failed in 2 of 2 tasks" in message
    log = work(recipe) / "logs" / "filter" / "logs" / "task_00000.log"
    assert str(log) in message and str(bad) in log.read_text()
    # Nothing a later step would read: no _SUCCESS, no curated output, no later job started.
    assert not (curated(recipe) / "_SUCCESS").exists()
    assert not list(curated(recipe).glob("output/*"))
    assert not (work(recipe) / "logs" / "exact-signatures").exists()
    with pytest.raises(DataError, match="run `midtrain data curate"):
        source_input(load_recipe(recipe), "web")
