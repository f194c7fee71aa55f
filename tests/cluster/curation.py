"""What the engine curation tests (Slurm, Ray) share: the corpus, the recipe, the CLI call and where its files land.

Each test curates the same corpus with `executor: local` and with its engine, and compares the curated files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from typer.testing import CliRunner

from tests.data.corpus import write_jsonl
from tests.data.test_curate import _docs

JOBS = ("filter", "exact-signatures", "exact-find", "exact-filter", "minhash-signatures", "minhash-buckets",
        "minhash-cluster", "minhash-filter", "finish")


def write_recipe(root: Path, executor: str, data: Path, engine_settings: str = "") -> Path:
    """A recipe curating `data` with `executor` (2 tasks per job) into ROOT/run-<executor>; `engine_settings` is
    appended to the curation block (e.g. ", slurm: {...}"). minhash_buckets 2 (default 14): each bucket is a task, and
    each task starts a Python that imports datatrove."""
    recipe = root / f"{executor}.yaml"
    recipe.write_text(
        f"base: preset:tiny-llama\ntokenizer: bytes\nrun_dir: {root / ('run-' + executor)}\n"
        f"sources:\n  - {{name: web, path: {data}, text_field: body}}\n"
        f"curation: {{filters: [gopher_repetition], tasks: 2, minhash_buckets: 2, executor: {executor}"
        f"{engine_settings}}}\n"
        "stages:\n  - {name: s, tokens: 1024, seq_len: 64, batch: {tokens: 256}, "
        "schedule: {kind: constant, peak_lr: 1e-3}, data: {mixture: {web: 1.0}}}\n")
    return recipe


def write_corpus(directory: Path) -> Path:
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
