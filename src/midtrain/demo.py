"""`midtrain demo`: an offline, two-stage mid-training run on a corpus built from what every Python install has.

Real data: English prose from `pydoc_data.topics` (the Python reference's help texts) and code from the standard
library's own sources. Synthetic data: arithmetic word problems with worked solutions (seeded). Nothing downloads.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

RECIPE_FILE = Path(__file__).parent / "recipes" / "demo.yaml"


def _write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def prose_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if len(text.strip()) > 200]


def code_documents(max_files: int = 400, max_chars: int = 12_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2_000)[:max_files]
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text[:max_chars])
    return docs


def math_documents(n: int, seed: int = 0) -> list[str]:
    """Synthetic arithmetic word problems with worked solutions."""
    rng = random.Random(seed)
    names = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken"]
    things = ["apples", "books", "coins", "marbles", "stamps", "pencils", "shells", "cards"]
    docs = []
    for _ in range(n):
        who, what = rng.choice(names), rng.choice(things)
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            q = f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?"
            s = f"{who} starts with {a} {what}. Buying {b} more gives {a} + {b} = {a + b}."
            ans = a + b
        elif kind == 1:
            big = a + b
            q = f"{who} had {big} {what} and gave away {b}. How many are left?"
            s = f"{who} gave away {b} of {big} {what}, so {big} - {b} = {big - b} remain."
            ans = big - b
        else:
            q = f"{who} fills {c} boxes with {a} {what} each. How many {what} is that in total?"
            s = f"There are {c} boxes of {a} {what}, so {c} * {a} = {c * a}."
            ans = c * a
        docs.append(f"Question: {q}\nSolution: {s}\nAnswer: {ans}")
    return docs


def build_corpus(out: Path, seed: int = 0) -> dict[str, int]:
    """Writes prose/code/math jsonl files into `out`; returns the document count per source."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = {"prose": prose_documents(), "code": code_documents(), "math": math_documents(4000, seed)}
    for name, docs in corpus.items():
        _write_jsonl(out / f"{name}.jsonl", docs)
    return {name: len(docs) for name, docs in corpus.items()}


def prepare(out: Path, quick: bool) -> tuple[Path, list[str]]:
    """Builds the corpus beside a copy of the demo recipe; returns (recipe path, overrides)."""
    out.mkdir(parents=True, exist_ok=True)
    build_corpus(out / "corpus")
    recipe = out / "demo-recipe.yaml"
    recipe.write_text(RECIPE_FILE.read_text())
    overrides = [f"run_dir={out / 'run'}"]
    if quick:
        overrides += [
            "stages.pretrain.tokens=98304",
            "stages.anneal.tokens=32768",
            "stages.anneal.eval.every_tokens=16384",
        ]
    return recipe, overrides
