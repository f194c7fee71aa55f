"""The demo's corpus: its synthetic retrieval documents never use the evaluation's passkey prompt (no train-on-test)."""

from __future__ import annotations

import re

from midtrain.demo import eval_template_sentences, math_documents, prose_documents, retrieval_documents
from midtrain.eval.tasks.haystack import split_sentences


def _words(text: str) -> int:
    return len(text.split())


def test_retrieval_documents_never_contain_the_eval_passkey_template():
    sentences = [s for d in prose_documents() for s in split_sentences(d)]
    docs = retrieval_documents(3000, 20, 200, _words, seed=0, prose_sentences=sentences)
    banned = [s.lower() for s in eval_template_sentences()]
    assert "remember it." in banned and "the grass is green." in banned and "pass key" in banned
    for doc in docs:
        low = doc.lower()
        hits = [b for b in banned if b in low]
        assert not hits, (hits, doc[:300])
        assert "passkey" not in low


def test_retrieval_documents_hold_their_answer_and_length():
    docs = retrieval_documents(200, 30, 120, _words, seed=1, prose_sentences=["A plain sentence of prose."] * 20)
    for doc in docs:
        assert _words(doc) <= 120 + 4
        key = re.findall(r"\d+", doc)[-1]
        assert doc.count(key) >= 2  # stated in the fact, repeated as the answer at the end
        assert doc.rstrip(".").endswith(key)


def test_math_documents_are_seeded():
    assert math_documents(5, seed=3) == math_documents(5, seed=3)
