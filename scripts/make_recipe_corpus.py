"""Regenerates the synthetic parts of recipes/corpus/ (math.jsonl, qa.jsonl) deterministically.

prose.jsonl and code.jsonl are real text (Python's pydoc topics and stdlib sources, cut small); the math word
problems with worked solutions and the instruction-style question/answer pairs are synthetic, made by the demo's
generator with fixed seeds:  python scripts/make_recipe_corpus.py
"""

from __future__ import annotations

import json
from pathlib import Path

from midtrain.demo import math_documents
from midtrain.io import write_text_atomic

CORPUS = Path(__file__).resolve().parent.parent / "recipes" / "corpus"


def main() -> None:
    math = math_documents(600, seed=11)
    write_text_atomic(CORPUS / "math.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in math))
    qa = []
    # instruction form: the question is the prompt, the solution and answer the response
    for doc in math_documents(300, seed=12):
        question, rest = doc.split("\nSolution: ", 1)
        qa.append({"prompt": question.removeprefix("Question: "), "response": rest.replace("\nAnswer: ", " Answer: ")})
    write_text_atomic(CORPUS / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in qa))
    print(f"wrote {len(math)} math documents and {len(qa)} instruction pairs to {CORPUS}")


if __name__ == "__main__":
    main()
