"""`midtrain demo`: an offline, three-stage mid-training run on a corpus built from what every Python install has.

Real data: English prose from `pydoc_data.topics` (the Python reference's help texts) and code from the standard
library's own sources. Synthetic data (seeded): arithmetic word problems with worked solutions, and retrieval
documents — a fact (a number) hidden in filler, asked for at the end — in templates of their own: different wording,
different filler and different keys than the evaluation's passkey prompt (`midtrain.eval.tasks.retrieval`), so the
demo never trains on its test. A byte-level BPE (vocab 2048, digits split) is trained on the corpus. Nothing
downloads. docs/DEMO.md has the measured numbers.
"""

from __future__ import annotations

import json
import os
import random
import re
import sysconfig
from collections.abc import Callable
from pathlib import Path

RECIPE_FILE = Path(__file__).parent / "recipes" / "demo.yaml"
BASE_RECIPE_FILE = Path(__file__).parent / "recipes" / "demo-base.yaml"
DEMO_BASE = Path(__file__).parent / "demo_base"  # the shipped base checkpoint (`midtrain demo --build-base`)
VOCAB_SIZE = 2048
BASE_LEN = 128  # L0: the base model's context
LONG_LEN = 512  # 4 x L0: the context-extension stage


def _write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def _chunks(text: str, max_chars: int, sep: str) -> list[str]:
    """`text` cut at `sep` boundaries into pieces of at most ~`max_chars` (a longer single piece stays whole)."""
    out, cur = [], ""
    for part in text.split(sep):
        if cur and len(cur) + len(sep) + len(part) > max_chars:
            out.append(cur)
            cur = part
        else:
            cur = f"{cur}{sep}{part}" if cur else part
    if cur.strip():
        out.append(cur)
    return [c.strip() for c in out if len(c.strip()) > 200]


def prose_documents(max_chars: int = 1_000) -> list[str]:
    """The pydoc help topics (real English prose about Python), cut at paragraphs into ~1 KB documents."""
    from pydoc_data.topics import topics

    docs = []
    for _, text in sorted(topics.items()):
        docs.extend(_chunks(text.strip(), max_chars, "\n\n"))
    return docs


def code_documents(max_files: int = 160, max_chars: int = 3_000) -> list[str]:
    """Standard-library modules (real Python code), cut at blank lines into ~3 KB documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2_000)[:max_files]
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.extend(_chunks(text[:24_000], max_chars, "\n\n"))
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


# ---------------------------------------------------------------------------------------- synthetic retrieval
# Templates of the demo's own. None of them is a sentence of the evaluation's passkey prompt (its intro, its needle
# "The pass key is {k}. ...", its question, or its "The grass is green." filler): tests/test_demo.py checks that.
# What makes the skill transfer (experiments/demo_retrieval): the thing named is a random pair of words out of
# thousands, so the model must find the question's phrase in the text and copy the number after it; with a dozen
# fixed nouns it memorised them instead (passkey 0.03), with nine varied templates it learned nothing in budget.
_INTROS = ["Below is a long memo. Somewhere in it is a number you will be asked about.", ""]
_PEOPLE = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken", "Linus",
           "Guido", "Radia", "Dennis", "Niklaus", "Tim"]
# (fact, question, answer lead-in) with {n} the named thing, {p} a person, {k} the key
_TEMPLATES = [
    ("The {n} is {k}. Keep it in mind. {k} is the {n}.", "What is the {n}?", "The {n} is"),
    ("{p}'s {n} is {k}. Note it down: {k}.", "What is {p}'s {n}?", "{p}'s {n} is"),
    ("Write this down: the {n} is {k}.", "Which number is the {n}?", "The {n} is"),
]
_ADJ = ["quiet", "old", "small", "bright", "distant", "narrow", "heavy", "gentle", "empty", "busy", "cold", "warm"]
_THINGS = ["river", "road", "house", "forest", "bridge", "market", "garden", "window", "train", "mountain", "lamp",
           "harbor", "library", "field", "tower", "kitchen"]
_VERBS = ["stands near", "leads to", "looks over", "waits by", "runs past", "hides behind", "faces", "follows"]


def name_vocabulary(prose: list[str], size: int = 5_000, seed: int = 5) -> list[str]:
    """`size` random pairs of words from `prose` ("basic ordering"): the things the retrieval facts name. "pass" and
    "key" are left out, so the evaluation's "pass key" is never one of them."""
    words = sorted({w.lower() for d in prose for w in re.findall(r"[A-Za-z]{3,9}", d)} - {"pass", "key"})
    rng = random.Random(seed)
    return [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(size)]


def _generated_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"The {rng.choice(_THINGS)} is {rng.choice(_ADJ)}."
    return f"The {rng.choice(_ADJ)} {rng.choice(_THINGS)} {rng.choice(_VERBS)} the {rng.choice(_THINGS)}."


def retrieval_documents(n: int, min_tokens: int, max_tokens: int, count: Callable[[str], int], seed: int,
                        names: list[str]) -> list[str]:
    """`n` documents of `min_tokens`..`max_tokens` tokens (uniform): intro, filler (2-6 generated sentences
    repeated) with a fact at a random depth, then a question and its answer. The fact names one of `names`; keys
    are 1-5 digit numbers (mostly 5, like the evaluation's 1..50000), the only digits in the document."""
    if not names:
        raise ValueError("retrieval_documents needs a non-empty list of names (see name_vocabulary)")
    rng = random.Random(seed)
    cache: dict[str, int] = {}

    def cost(text: str) -> int:
        if text not in cache:
            cache[text] = count(" " + text)
        return cache[text]

    docs = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens)
        k = str(rng.randint(1, 99_999))
        fact, question, lead = rng.choice(_TEMPLATES)
        fill = {"n": rng.choice(names), "p": rng.choice(_PEOPLE), "k": k}
        fact, question, lead = (t.format(**fill) for t in (fact, question, lead))
        answer = f"{lead} {k}.".strip()
        intro = rng.choice(_INTROS)
        fixed = count(intro) + count(" " + fact) + count(" " + question) + count(" " + answer) + 2
        cycle = [_generated_sentence(rng) for _ in range(rng.randint(2, 6))]
        filler, used = [], 0
        for i in range(400):
            c = cost(cycle[i % len(cycle)])
            if fixed + used + c > target:
                break
            filler.append(cycle[i % len(cycle)])
            used += c
        at = rng.randint(0, len(filler))
        body = filler[:at] + [fact] + filler[at:]
        docs.append(" ".join(([intro] if intro else []) + body + [question, answer]))
    return docs


def build_corpus(out: Path, seed: int = 0, quick: bool = False, tokenizer_from: Path | None = None
                 ) -> dict[str, int]:
    """Writes the corpus (jsonl per source) and the tokenizer (`out/tokenizer`); returns documents per source.

    The tokenizer is `tokenizer_from`'s (the shipped base's: a model only reads the ids it was trained on), else a
    BPE trained here on prose + code + math.
    """
    from midtrain.data.tokenizer import train_bpe
    from midtrain.model import load_tokenizer

    corpus_dir = out / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    prose = prose_documents()
    corpus = {"prose": prose, "code": code_documents(), "math": math_documents(6000, seed)}
    if tokenizer_from is not None:
        tok = load_tokenizer(tokenizer_from)
    else:
        tok = train_bpe((d for docs in corpus.values() for d in docs), VOCAB_SIZE)
    tok.save_pretrained(str(out / "tokenizer"))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    names = name_vocabulary(prose)
    scale = 4 if quick else 1
    corpus["recall"] = retrieval_documents(24_000 // scale, int(0.3 * BASE_LEN), BASE_LEN - 2, count, seed + 1, names)
    corpus["recall_long"] = retrieval_documents(6_000 // scale, int(0.3 * LONG_LEN), LONG_LEN - 2, count, seed + 2,
                                                names)
    for name, docs in corpus.items():
        _write_jsonl(corpus_dir / f"{name}.jsonl", docs)
    return {name: len(docs) for name, docs in corpus.items()}


QUICK_OVERRIDES = [
    "stages.anneal.tokens=96k",
    "stages.extend.tokens=160k",
    "stages.extend.schedule.warmup_tokens=16k",
    "stages.extend.eval.samples=20",
    "stages.anneal.eval.samples=20",
]

# What a shipped base must hold: an HF checkpoint, midtrain's record of it (its last LR: the anneal's `from_base`)
# and the tokenizer it was trained with.
_BASE_FILES = ("config.json", "model.safetensors", "midtrain.json", "tokenizer.json", "tokenizer_config.json")


def check_base(base: Path) -> None:
    """A clear error when the demo's base checkpoint is missing or incomplete (rather than a loader traceback)."""
    missing = [name for name in _BASE_FILES if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the demo's base checkpoint {base} lacks {', '.join(missing)}; rebuild it with "
            "`midtrain demo --build-base` (about 30 CPU-minutes, docs/DEMO.md)")


def prepare(out: Path, quick: bool, base: Path = DEMO_BASE) -> tuple[Path, list[str]]:
    """Builds the corpus (with the base's tokenizer) beside a copy of the demo recipe; returns (recipe, overrides)."""
    check_base(base)
    out.mkdir(parents=True, exist_ok=True)
    build_corpus(out, quick=quick, tokenizer_from=base)
    recipe = out / "demo-recipe.yaml"
    recipe.write_text(RECIPE_FILE.read_text())
    overrides = [f"run_dir={out / 'run'}", f"base={base.resolve()}"]
    if quick:
        overrides += QUICK_OVERRIDES
    return recipe, overrides


def prepare_base(out: Path) -> tuple[Path, list[str]]:
    """Corpus, a freshly trained tokenizer and a copy of the base recipe, for `midtrain demo --build-base`."""
    out.mkdir(parents=True, exist_ok=True)
    build_corpus(out)
    recipe = out / "demo-base-recipe.yaml"
    recipe.write_text(BASE_RECIPE_FILE.read_text())
    return recipe, [f"run_dir={out / 'run'}"]


def install_base(export: Path, metrics: dict, dest: Path = DEMO_BASE) -> Path:
    """Copies the base's HF export (weights, config, midtrain.json and the tokenizer it saves beside them) into
    `dest` (replaced whole, never half-written) with a `provenance.json` saying how it was made and what it scored."""
    import shutil

    from midtrain.io import publish_dir
    from midtrain.model.verify import MANIFEST
    from midtrain.run import PROBE_FILE

    def write(tmp: Path) -> None:
        for item in export.iterdir():
            if item.is_file() and item.name not in (PROBE_FILE, MANIFEST):  # the export's checks, not the model
                shutil.copy2(item, tmp / item.name)
        provenance = {"rebuild": "midtrain demo --build-base", "recipe": "src/midtrain/recipes/demo-base.yaml",
                      "metrics": metrics}
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
        check_base(tmp)

    return publish_dir(dest, write)


def eval_template_sentences() -> list[str]:
    """Every sentence of the evaluation's passkey prompt (intro, needle, question, filler), for the leak test."""
    from midtrain.eval.tasks.haystack import NOISE
    from midtrain.eval.tasks.retrieval import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION

    parts = [PASSKEY_INTRO, PASSKEY_NEEDLE.replace("{k}", " "), PASSKEY_QUESTION, *NOISE]
    sentences = [s.strip() for p in parts for s in re.split(r"(?<=[.?])\s", p) if len(s.strip()) > 3]
    return sorted(set(sentences + ["pass key"]))
