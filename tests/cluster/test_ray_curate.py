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
from typer.testing import CliRunner

from tests.cluster.ray_fixtures import ray_head  # noqa: F401  (fixture)
from tests.data.corpus import write_jsonl
from tests.data.test_curate import _docs

pytest.importorskip("datatrove")
pytest.importorskip("spacy")
pytestmark = [
    pytest.mark.slow,
    # datatrove 0.10 passes placement groups the pre-2.x way; Ray warns once per task
    pytest.mark.filterwarnings("ignore:placement_group:DeprecationWarning"),
]

JOBS = ("filter", "exact-signatures", "exact-find", "exact-filter", "minhash-signatures", "minhash-buckets",
        "minhash-cluster", "minhash-filter", "finish")


def _recipe(root: Path, executor: str, data: Path) -> Path:
    # minhash_buckets 2 (default 14): each bucket is a Ray task, and each Ray task costs a worker start (~2-3 s).
    recipe = root / f"{executor}.yaml"
    recipe.write_text(
        f"base: preset:tiny-llama\ntokenizer: bytes\nrun_dir: {root / ('run-' + executor)}\n"
        f"sources:\n  - {{name: web, path: {data}, text_field: body}}\n"
        f"curation: {{filters: [gopher_repetition], tasks: 2, minhash_buckets: 2, executor: {executor}}}\n"
        "stages:\n  - {name: s, tokens: 1024, seq_len: 64, batch: {tokens: 256}, "
        "schedule: {kind: constant, peak_lr: 1e-3}, data: {mixture: {web: 1.0}}}\n")
    return recipe


def _corpus(directory: Path) -> Path:
    """18 documents: 12 distinct, 4 near-duplicates, an exact duplicate and repetitive junk (tests/data/test_curate)."""
    distinct, near = _docs()
    write_jsonl(directory / "web.jsonl", distinct + near + [distinct[5], "buy now " * 200], field="body")
    return directory


def curate_cli(recipe: Path):
    from midtrain.cli import app

    return CliRunner().invoke(app, ["data", "curate", str(recipe)], terminal_width=200)


def run_dir(recipe: Path) -> Path:
    return recipe.parent / f"run-{recipe.stem}"


def curated(recipe: Path) -> Path:
    from midtrain.config import load_recipe
    from midtrain.data.prepare import curated_dir

    return curated_dir(load_recipe(recipe)) / "web"


def work(recipe: Path) -> Path:
    from midtrain.config import load_recipe
    from midtrain.data.prepare import run_layout

    return run_layout(load_recipe(recipe)).curation_work("web")


def contents(recipe: Path) -> dict[str, bytes]:
    """Curated files by name, decompressed (gzip's header holds the write time) and with the run directory replaced
    by "RUN" (datatrove's metadata keeps the path of the intermediate file each document was read from)."""
    run = str(run_dir(recipe)).encode()
    return {f.name: gzip.decompress(f.read_bytes()).replace(run, b"RUN")
            for f in sorted((curated(recipe) / "output").glob("*.jsonl.gz"))}


def task_logs(recipe: Path) -> dict[str, int]:
    """mtime of every task log, by "job/task_XXXXX.log": a task that runs again rewrites its log."""
    logs = work(recipe) / "logs"
    return {f"{f.parent.parent.name}/{f.name}": f.stat().st_mtime_ns for f in logs.glob("*/logs/task_*.log")}


@pytest.fixture(scope="module")
def both(tmp_path_factory, ray_head):  # noqa: F811
    """The same corpus curated by the local executor and on Ray (one Ray run shared by the tests below)."""
    root = tmp_path_factory.mktemp("ray-curate")
    data = _corpus(root / "web")
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

    data = _corpus(tmp_path / "web")
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
