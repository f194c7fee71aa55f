"""A small offline downstream task: arithmetic word problems, few-shot, exact match on the first integer."""

from __future__ import annotations

import random

from midtrain.eval.tasks.base import Sample, task_rng

_NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Ken")
_THINGS = ("apples", "books", "coins", "marbles", "stamps", "pencils", "shells", "cards")


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One problem (add, subtract or multiply, the demo corpus's templates) and its answer."""
    who, what = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{who} has {a} {what} and buys {b} more. How many {what} does {who} have now?", a + b
    if kind == 1:
        return f"{who} had {a + b} {what} and gave away {b}. How many are left?", a
    return f"{who} fills {c} boxes with {a} {what} each. How many {what} is that in total?", c * a


def arith_samples(n: int, seed: int, shots: int = 2) -> list[Sample]:
    """`n` questions after `shots` worked examples (the examples are drawn from their own RNG stream)."""
    shot_rng = task_rng(seed, "arith-shots")
    prefix = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in (word_problem(shot_rng) for _ in range(shots)))
    rng = task_rng(seed, "arith")
    out = []
    for _ in range(n):
        question, answer = word_problem(rng)
        out.append(Sample("arith", f"{prefix}Question: {question}\nAnswer:", (str(answer),), "first_int"))
    return out
