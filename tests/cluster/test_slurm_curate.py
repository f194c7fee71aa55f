"""`midtrain data curate` on a real Slurm cluster (scripts/slurm_local.sh, tests/cluster/conftest.py) against the
local executor.

The same recipe and corpus are curated with `executor: local` and `executor: slurm` (2 tasks per job, so each job is
a 2-element sbatch array chained to the previous job with `afterok`): `midtrain data curate` waits for the chain and
the curated files must be the same files with the same documents in the same order (compared decompressed: gzip
headers carry a timestamp). Then: a re-submission submits nothing, and a corrupt input file fails with an error naming
the file and the task's log, cancels the rest of the chain and leaves no `_SUCCESS` behind.

Run locally: `apt-get install -y slurm-wlm munge`, then `pytest -m slurm tests/cluster` (the fixture starts and stops
the cluster; about a minute on 2 cores).
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from tests.cluster.curation import JOBS, contents, curate_cli, curated, work, write_corpus, write_recipe

pytest.importorskip("datatrove")
pytest.importorskip("spacy")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ", slurm: {partition: debug, time: '00:10:00', mem_per_cpu_gb: 1}"  # the local cluster's partition


def _recipe(root: Path, executor: str, data: Path) -> Path:
    # curation.slurm: a short time limit, and a memory request that fits any machine
    return write_recipe(root, executor, data, SLURM if executor == "slurm" else "")


def our_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T %r"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "midtrain-web" in line]


@pytest.fixture(scope="module")
def both(tmp_path_factory, slurm_cluster):
    """The same corpus curated by the local executor and on Slurm (one Slurm run shared by the tests below)."""
    root = tmp_path_factory.mktemp("slurm-curate")
    data = write_corpus(root / "web")
    recipes = {ex: _recipe(root, ex, data) for ex in ("local", "slurm")}
    for ex, recipe in recipes.items():
        result = curate_cli(recipe)
        assert result.exit_code == 0, f"{ex}: {result.output}"
    return recipes


def test_slurm_curation_writes_exactly_the_local_output(both):
    assert (curated(both["slurm"]) / "_SUCCESS").is_file() and (curated(both["local"]) / "_SUCCESS").is_file()
    got, want = contents(both["slurm"]), contents(both["local"])
    assert sorted(got) == sorted(want) == ["00000.jsonl.gz", "00001.jsonl.gz"]  # one file per task
    assert got == want
    assert sum(text.count(b"\n") for text in got.values()) == 12  # dedup really ran: 18 in, 12 kept
    logs = work(both["slurm"]) / "logs"
    for job in JOBS:  # every job of the chain ran as Slurm tasks and marked each of them complete
        tasks = {"exact-find": 1, "minhash-cluster": 1, "finish": 1}.get(job, 2)
        assert len(list((logs / job / "completions").iterdir())) == tasks, job
        assert (logs / job / "launch_script.slurm").is_file(), job  # really submitted with sbatch
    assert not our_jobs()  # `midtrain data curate` returned after the whole chain, stats merges included


def test_resubmission_submits_nothing_when_complete(both):
    slurm = both["slurm"]
    want = contents(slurm)
    scripts = {p: p.stat().st_mtime_ns for p in (work(slurm) / "logs").glob("*/launch_script.slurm")}
    result = curate_cli(slurm)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in scripts} == scripts  # no job was launched again
    assert contents(slurm) == want and not our_jobs()


def test_corrupt_input_fails_naming_file_and_task_log(tmp_path, slurm_cluster):
    from midtrain.config import load_recipe
    from midtrain.data.errors import DataError
    from midtrain.data.prepare import source_input

    data = write_corpus(tmp_path / "web")
    bad = data / "zz-bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"body": "fine"}\n' * 50)[:-30])  # truncated: fails mid-file
    recipe = _recipe(tmp_path, "slurm", data)
    result = curate_cli(recipe)
    assert result.exit_code != 0
    message = " ".join(result.output.split())  # rich wraps long lines
    assert str(bad) in message and "curation job 'filter' failed in 2 of 2 tasks" in message, message
    log = work(recipe) / "logs" / "filter" / "logs" / "task_00000.log"
    assert str(log) in message and str(bad) in log.read_text()
    # Nothing a later step would read: no _SUCCESS, no curated output; the rest of the chain was cancelled.
    assert not (curated(recipe) / "_SUCCESS").exists()
    assert not list(curated(recipe).glob("output/*"))
    assert not list((work(recipe) / "logs" / "exact-signatures").glob("completions/*"))
    assert not our_jobs()
    with pytest.raises(DataError, match="run `midtrain data curate"):
        source_input(load_recipe(recipe), "web")
