"""Stage gates: conditions on a stage's after-eval that decide whether the ladder goes on.

Syntax (recipe `gate:` mapping, metric -> condition):
    passkey@1024: ">= 0.9"      absolute threshold
    ppl.general: "<= +3%"       relative to the stage's before-eval: after <= before * 1.03
    loss.math: "< -1%"          after < before * 0.99
Operators: >=, <=, >, <, ==. A `%` makes the threshold relative to the same metric in the stage's before-eval.

Also the vocabulary of evaluation tasks and the metric names they produce, so a recipe can be checked (unknown task,
metric not produced by the stage's tasks/lengths, bad syntax) before anything trains. No torch here.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from midtrain.eval.keys import DOMAIN_TASKS, HARNESS, MetricKey

# Tasks a stage's `eval.tasks` may list (harness tasks are written `harness:<lm-eval task>`).
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
LENGTH_TASKS = ("ppl", "passkey", "niah", "ruler", *(f"ruler.{t}" for t in RULER_TASKS))  # need eval.lengths
TASKS = ("loss", "arith", *LENGTH_TASKS)
HARNESS_PREFIX = "harness:"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}
_CONDITION_RE = re.compile(r"^\s*(>=|<=|==|>|<)\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(%?)\s*$")


def task_problem(task: str) -> str | None:
    """Why `task` is not a known evaluation task, or None."""
    if task in TASKS:
        return None
    if task.startswith(HARNESS_PREFIX) and task[len(HARNESS_PREFIX):].strip():
        return None
    return f"unknown task {task!r}; known: {', '.join(TASKS)}, {HARNESS_PREFIX}<lm-eval task>"


def ruler_tasks_of(tasks: Sequence[str]) -> list[str]:
    """The RULER sub-tasks a task list asks for (`ruler` = all of them), in canonical order."""
    keys = [k for k in map(MetricKey.try_parse, tasks)
            if k is not None and k.family == "ruler" and k.length is None and k.domain is None]
    wanted = set(RULER_TASKS) if any(k.variant is None for k in keys) else {k.variant for k in keys}
    return [t for t in RULER_TASKS if t in wanted]


def metric_problem(metric: str, tasks: Sequence[str], lengths: Sequence[int], domains: Sequence[str]) -> str | None:
    """Why `metric` is not produced by an evaluation with these tasks/lengths/domains, or None."""
    try:
        key = MetricKey.parse(metric)
    except ValueError as exc:
        return str(exc)
    if key.length is not None:
        name = key.task
        if key.domain is not None:
            return (f"unknown metric {metric!r}; length metrics have no domain: ppl@L, loss@L, passkey@L, niah@L, "
                    f"ruler@L, ruler.<task>@L")
        if name in DOMAIN_TASKS:
            needs, have = "'ppl'", "ppl" in tasks
        elif name in ("passkey", "niah"):
            needs, have = repr(name), name in tasks
        elif name == "ruler":
            needs, have = "'ruler' or a 'ruler.<task>'", bool(ruler_tasks_of(tasks))
        elif key.family == "ruler" and key.variant in RULER_TASKS:
            needs, have = f"'ruler' or {name!r}", key.variant in ruler_tasks_of(tasks)
        else:
            return (f"unknown metric {metric!r}; length metrics: ppl@L, loss@L, passkey@L, niah@L, ruler@L, "
                    f"ruler.<task>@L (tasks: {', '.join(RULER_TASKS)})")
        if not have:
            return f"metric {metric!r} needs {needs} in eval.tasks (got {list(tasks)})"
        if key.length not in lengths:
            return f"metric {metric!r}: {key.length} is not one of eval.lengths {list(lengths)}"
        return None
    if key.task in DOMAIN_TASKS:
        if "loss" not in tasks:
            return f"metric {metric!r} needs 'loss' in eval.tasks (got {list(tasks)})"
        if key.domain is not None and key.domain not in domains:
            return f"metric {metric!r}: unknown domain {key.domain!r}; domains: {sorted(set(domains))}"
        return None
    if key.task == "arith":
        return None if "arith" in tasks else f"metric 'arith' needs 'arith' in eval.tasks (got {list(tasks)})"
    if key.family == HARNESS:
        if not any(t.startswith(HARNESS_PREFIX) for t in tasks):
            return f"metric {metric!r} needs a {HARNESS_PREFIX}<task> entry in eval.tasks"
        return None
    return (f"unknown metric {metric!r}; metrics: loss, ppl, loss.<domain>, ppl.<domain>, ppl@L, loss@L, passkey@L, "
            "niah@L, ruler@L, ruler.<task>@L, arith, harness.<task>.<metric>")


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    op: str
    value: float
    relative: bool  # value is a percentage of the before-eval's metric

    def threshold(self, before: float | None) -> float:
        if not self.relative:
            return self.value
        if before is None or not math.isfinite(before):
            raise ValueError("a relative (%) condition needs the metric in the stage's before-eval")
        return before * (1.0 + self.value / 100.0)


def parse_condition(text: object) -> Condition:
    """`">= 0.9"` -> Condition('>=', 0.9, False); `"<= +3%"` -> Condition('<=', 3.0, True). Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a condition string like \">= 0.9\" or \"<= +3%\", got {text!r}")
    match = _CONDITION_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot parse condition {text!r}: expected OP NUMBER[%] with OP one of {', '.join(_OPS)} "
            '(e.g. ">= 0.9", "<= +3%")'
        )
    op, number, percent = match.groups()
    return Condition(op, float(number), relative=bool(percent))


def gate_problems(gate: Mapping[str, object], tasks: Sequence[str], lengths: Sequence[int],
                  domains: Sequence[str]) -> list[tuple[str, str]]:
    """(metric, problem) for every gate entry that cannot be evaluated: bad syntax or a metric the eval lacks."""
    problems = []
    for metric, text in gate.items():
        try:
            parse_condition(text)
        except ValueError as exc:
            problems.append((metric, str(exc)))
            continue
        why = metric_problem(metric, tasks, lengths, domains)
        if why:
            problems.append((metric, why))
    return problems


@dataclass(frozen=True)
class ConditionResult:
    metric: str
    condition: str
    value: float | None  # the after-eval's value (None: not measured)
    before: float | None
    threshold: float | None
    passed: bool
    reason: str  # one line a person can act on

    def to_json(self) -> dict:
        return asdict(self)


def evaluate_gate(gate: Mapping[str, str], after: Mapping[str, float], before: Mapping[str, float] | None = None,
                  skipped: Mapping[str, str] | None = None) -> list[ConditionResult]:
    """Every condition against the after-eval (and the before-eval for relative ones), in the gate's order. A metric
    the eval did not measure fails its condition, with the eval's reason (`skipped`: its details' skip notes)."""
    results = []
    before, skipped = before or {}, skipped or {}
    for metric, text in gate.items():
        cond = parse_condition(text)
        value, prior = after.get(metric), before.get(metric)
        if value is None:
            key = MetricKey.try_parse(metric)
            why = skipped.get(metric) or (skipped.get(HARNESS) if key is not None and key.family == HARNESS else None)
            results.append(ConditionResult(metric, text, None, prior, None, False,
                                           f"{metric} {text}: not measured by the after-eval"
                                           + (f" ({why})" if why else "")))
            continue
        try:
            limit = cond.threshold(prior)
        except ValueError as exc:
            results.append(ConditionResult(metric, text, value, prior, None, False, f"{metric} {text}: {exc}"))
            continue
        passed = bool(math.isfinite(value) and _OPS[cond.op](value, limit))
        rel = f" (before {prior:.4g}, limit {limit:.4g})" if cond.relative else ""
        verdict = "ok" if passed else "FAILED"
        results.append(ConditionResult(metric, text, value, prior, limit, passed,
                                       f"{metric} {text}: got {value:.4g}{rel} -> {verdict}"))
    return results


def stage_eval_problems(recipe) -> list[tuple[tuple[str | int, ...], str]]:
    """Recipe-time checks of every stage's `eval` and `gate` slots, as (field path, message) problems."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    domains = [s.domain_name for s in recipe.sources]
    for i, stage in enumerate(recipe.stages):
        cfg = stage.eval
        for j, task in enumerate(cfg.tasks):
            why = task_problem(task)
            if why:
                problems.append((("stages", i, "eval", "tasks", j), why))
        wants_lengths = [t for t in cfg.tasks if t in LENGTH_TASKS]
        if wants_lengths and not cfg.lengths:
            problems.append((("stages", i, "eval", "lengths"), f"required by tasks {wants_lengths}"))
        for metric, why in gate_problems(stage.gate, cfg.tasks, cfg.lengths, domains):
            problems.append((("stages", i, "gate", metric), why))
    return problems
