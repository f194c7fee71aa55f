"""Metric keys: the names evaluations write and gates, reports and mixture searches read. Torch-free.

Grammar (`MetricKey.parse` / `str()` round-trip):
    TASK                 loss, ppl, arith
    TASK.DOMAIN          loss.math, ppl.general          (DOMAIN only for loss and ppl: per-domain held-out loss)
    TASK@LENGTH          passkey@1024, niah@512, ppl@2048, loss@2048, ruler@512, ruler.vt@512
    harness.TASK.METRIC  lm-eval results, kept verbatim after `harness.` (a metric like `pass@1` is not a length)
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN_TASKS = ("loss", "ppl")  # tasks with a per-domain variant; lower is better
HARNESS = "harness"


@dataclass(frozen=True)
class MetricKey:
    """One metric name: `task` (`ruler.vt` keeps its sub-task), the context `length` it was measured at, and the
    `domain` of a per-domain loss/perplexity."""

    task: str
    length: int | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"metric key: empty task in {self!r}")
        if self.family == HARNESS:
            if not self.task[len(HARNESS) + 1:] or self.length is not None or self.domain is not None:
                raise ValueError(f"metric key {self.task!r}: harness metrics are harness.<task>.<metric>")
            return
        if "@" in self.task or any(not part for part in self.task.split(".")):
            raise ValueError(f"metric key: malformed task {self.task!r}")
        if self.family in DOMAIN_TASKS and self.task != self.family:
            raise ValueError(f"metric key: {self.task!r} names a domain; give it as domain=")
        if self.length is not None and (isinstance(self.length, bool) or not isinstance(self.length, int)
                                        or self.length <= 0):
            raise ValueError(f"metric key: length must be a positive number of tokens (got {self.length!r})")
        if self.domain is not None:
            if self.task not in DOMAIN_TASKS:
                raise ValueError(f"metric key: only {', '.join(DOMAIN_TASKS)} have domains (got {self.task!r})")
            if not isinstance(self.domain, str) or not self.domain or "@" in self.domain:
                raise ValueError(f"metric key: malformed domain {self.domain!r}")

    @classmethod
    def parse(cls, text: str) -> MetricKey:
        """`"passkey@1024"` -> MetricKey("passkey", 1024); `"loss.math"` -> MetricKey("loss", domain="math").
        Raises ValueError saying what is malformed."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"metric key: expected a name like loss, passkey@1024 or loss.math (got {text!r})")
        if text.startswith(HARNESS + "."):
            return cls(text)
        name, at, length_text = text.partition("@")
        length = None
        if at:
            if not length_text.isdigit() or not length_text.isascii():
                raise ValueError(f"metric {text!r}: the part after '@' must be a length in tokens")
            length = int(length_text)
        head, dot, domain = name.partition(".")
        if dot and head in DOMAIN_TASKS:
            if not domain:
                raise ValueError(f"metric {text!r}: empty domain after '{head}.'")
            return cls(head, length, domain)
        try:
            return cls(name, length)
        except ValueError as e:
            raise ValueError(f"metric {text!r}: {e}") from None

    @classmethod
    def try_parse(cls, text: object) -> MetricKey | None:
        """The key, or None for a name that is not one (e.g. a metrics row's `tokens` field is one; `a@b` is not)."""
        try:
            return cls.parse(text)  # type: ignore[arg-type]
        except ValueError:
            return None

    def __str__(self) -> str:
        out = self.task
        if self.domain is not None:
            out += f".{self.domain}"
        if self.length is not None:
            out += f"@{self.length}"
        return out

    @property
    def family(self) -> str:
        """The task before its first dot: `ruler` for ruler.vt, `harness` for harness metrics."""
        return self.task.partition(".")[0]

    @property
    def variant(self) -> str | None:
        """The task after its family: `vt` for ruler.vt, `hellaswag.acc` for harness.hellaswag.acc."""
        return self.task.partition(".")[2] or None

    @property
    def lower_is_better(self) -> bool:
        """Losses and perplexities fall as a model improves; accuracies and recalls rise."""
        return self.family in DOMAIN_TASKS
