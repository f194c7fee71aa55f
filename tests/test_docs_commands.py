"""Every `midtrain` command in the README and docs/ is one the CLI accepts: the verb exists and every option and
argument parses (click's own parser, nothing invoked). A renamed option or verb breaks this test, not a newcomer's
first try (issue 24). The cheap, offline ones also run for real.

Usage-style lines are normalised first: `[--opt X]` means the option is given, `A|B` takes A, numeric placeholders (N, L0) get a number, `\\` joins lines and a
trailing `# comment` is dropped.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from midtrain.cli.root import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for every `midtrain ...` or `-m midtrain ...` line inside a fenced code block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = re.sub(r"\s#\s.*$", "", line).strip()
                match = re.search(r"(?:^|&& |\s-m )midtrain (.*)$", line)
                if match and not line.startswith("#"):
                    found.append((f"{doc.name}: {line}", match.group(1)))
    return found


# Numeric placeholders of usage lines, given a value of their type (path-like ones parse as they are).
PLACEHOLDERS = {"N": "2", "L": "1024", "L0": "256", "B": "4", "T": "40k"}


def normalise(args: str) -> list[str]:
    args = args.replace("[", " ").replace("]", " ")
    args = re.sub(r"(\S+)\|\S+", r"\1", args)  # drop|redact -> drop, SOURCE|PATH -> SOURCE
    return [PLACEHOLDERS.get(word, word) for word in shlex.split(args)]


def parse(argv: list[str]) -> str | None:
    """Resolve the verb and parse its arguments as the CLI would, without running it: None if they parse, else
    the CLI's usage message (typer's vendored click raises its own UsageError class: matched by its interface)."""
    command = typer.main.get_command(app)
    path = ["midtrain"]
    while hasattr(command, "commands"):  # a group: the first word names the sub-command
        if not argv or argv[0] not in command.commands:
            return f"{' '.join(path)}: no command {argv[0] if argv else ''!r}"
        path.append(argv[0])
        command, argv = command.commands[argv[0]], argv[1:]
    try:
        command.make_context(" ".join(path), list(argv))
    except Exception as e:  # noqa: BLE001 - click's UsageError family, by its interface
        if hasattr(e, "format_message"):
            return f"{' '.join(path)}: {e.format_message()}"
        raise
    return None


COMMANDS = documented_commands()


def test_the_docs_show_many_commands():
    assert len(COMMANDS) >= 40, COMMANDS  # the extraction itself must not silently find nothing


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, command):
    problem = parse(normalise(command))
    assert problem is None, f"{where}\n  -> {problem}"


def test_parse_catches_a_renamed_option_and_a_missing_verb():
    assert "--factr" in parse(normalise("rope show --method yarn --factr 4"))
    assert "lint" in parse(normalise("recipe lint my.yaml"))
    assert parse(normalise("rope show --method yarn --factor 4")) is None


@pytest.mark.parametrize("where,command", [(w, c) for w, c in COMMANDS if c.startswith("rope show")
                                           and "--checkpoint" not in c and "--plot" not in c])
def test_documented_rope_show_runs(where, command):
    result = subprocess.run([sys.executable, "-m", "midtrain", *normalise(command)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{where}\n{result.stderr}"
    assert "Traceback" not in result.stderr
