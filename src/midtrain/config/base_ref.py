"""A recipe's `base:` parsed once: a local checkpoint directory, `preset:NAME` (a tiny architecture built from
scratch, tests and demos) or `hub:ID` (a Hugging Face id, loaded only because the user asked for it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BaseKind = Literal["path", "preset", "hub"]


@dataclass(frozen=True)
class BaseRef:
    kind: BaseKind
    name: str  # the directory, the preset's name or the hub id, without its prefix

    @classmethod
    def parse(cls, text: str) -> BaseRef:
        for kind in ("preset", "hub"):
            if text.startswith(f"{kind}:"):
                return cls(kind, text.removeprefix(f"{kind}:"))
        return cls("path", text)

    @property
    def is_preset(self) -> bool:
        return self.kind == "preset"

    @property
    def allow_hub(self) -> bool:
        """Whether loading may reach the Hugging Face hub (only for `hub:` bases: offline by default)."""
        return self.kind == "hub"

    def __str__(self) -> str:
        return self.name if self.kind == "path" else f"{self.kind}:{self.name}"
