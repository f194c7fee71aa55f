"""Every citation of a repository document resolves: "REFERENCE §N", "CONTRACTS.md §N.M", docs/<X>.md, [x](<X>.md).

What is checked (only what can be checked reliably):
- `REFERENCE` / `CONTRACTS` (with or without `.md`), `docs/<NAME>.md` and a bare upper-case `<NAME>.md` name a file
  that exists (bare names are looked up beside the citing file, in docs/ and at the repository root);
- a `§N` / `§N.M` right after such a name (and the `, §M` / `and §M` / `–M` that continue it) is a numbered heading
  of that file (`## N. Title`, `### N.M Title`);
- a markdown link to a `.md` file points to an existing file, relative to the linking file.
A bare `§N` with no document name before it (a doc citing itself, "Llama 3 §3.1.3") is not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "tests", "benchmarks", "experiments", "docs", "recipes", "scripts", "README.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}
SKIP_PARTS = {"__pycache__", ".pytest_cache"}

_NUM = r"\d+(?:\.\d+)*"
# A document name: docs/<NAME>.md, a bare <NAME>.md, or the two docs cited without a suffix.
_DOC = r"(?<![\w/.\-])(?P<doc>(?:docs/)?[A-Z][A-Z0-9_]*\.md|(?:REFERENCE|CONTRACTS)\b)"
# Optional sections after it: "§2", "§2, §5", "§2 and §3", "§4–4.1".
_SECS = rf"(?P<secs>[ \t]*§[ \t]*{_NUM}(?:[ \t]*(?:,|and)[ \t]*§[ \t]*{_NUM}|[ \t]*[–—][ \t]*§?{_NUM})*)?"
CITATION = re.compile(_DOC + _SECS)
# A markdown link to a .md file, optionally followed by sections ("[CONTRACTS.md](CONTRACTS.md) §4–4.1").
LINK = re.compile(r"\]\((?P<target>[^)\s#:]+\.md)(?:#[^)]*)?\)" + _SECS)
HEADING = re.compile(rf"^#{{1,6}}[ \t]+§?(?P<num>{_NUM})\.?(?:[ \t]|$)")


@dataclass(frozen=True)
class Citation:
    file: Path
    line: int
    doc: str  # as written
    target: Path | None  # the file it resolves to (None: nothing found)
    sections: tuple[str, ...]


def section_numbers(secs: str | None) -> tuple[str, ...]:
    return tuple(re.findall(_NUM, secs or ""))


def heading_numbers(text: str) -> set[str]:
    """Numbers of the numbered headings of a markdown document ("## 5. Run directory" -> "5")."""
    return {m["num"] for line in text.splitlines() if (m := HEADING.match(line))}


def _resolve_name(root: Path, file: Path, doc: str) -> Path | None:
    if doc in ("REFERENCE", "CONTRACTS"):
        candidates = [root / "docs" / f"{doc}.md"]
    elif doc.startswith("docs/"):
        candidates = [root / doc]
    else:
        candidates = [file.parent / doc, root / "docs" / doc, root / doc]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def find_citations(root: Path, file: Path) -> list[Citation]:
    """The document citations in one file, each resolved against the repository at `root`."""
    out = []
    for i, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        for m in CITATION.finditer(line):
            out.append(Citation(file, i, m["doc"], _resolve_name(root, file, m["doc"]), section_numbers(m["secs"])))
        if file.suffix == ".md":
            for m in LINK.finditer(line):
                target = (file.parent / m["target"]).resolve()
                out.append(Citation(file, i, m["target"], target if target.is_file() else None,
                                    section_numbers(m["secs"])))
    return out


def scanned_files(root: Path, scanned: tuple[str, ...] = SCANNED) -> list[Path]:
    files = []
    for name in scanned:
        p = root / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in SUFFIXES
                      and not SKIP_PARTS & set(f.parts) and not any(x.endswith(".egg-info") for x in f.parts)]
    return files


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def citation_problems(root: Path, scanned: tuple[str, ...] = SCANNED) -> list[str]:
    """One line per citation that does not resolve, naming file:line (each problem once)."""
    root = root.resolve()
    problems: list[str] = []
    headings: dict[Path, set[str]] = {}
    for file in scanned_files(root, scanned):
        for c in find_citations(root, file):
            where = f"{_rel(c.file, root)}:{c.line}"
            if c.target is None:
                problems.append(f"{where}: cites {c.doc}, which is not in the repository")
                continue
            if c.target not in headings:
                headings[c.target] = heading_numbers(c.target.read_text(encoding="utf-8"))
            for s in c.sections:
                if s not in headings[c.target]:
                    problems.append(f"{where}: cites {c.doc} §{s}, but {_rel(c.target, root)} has no "
                                    f"heading numbered {s}")
    return list(dict.fromkeys(problems))


# --- the repository -------------------------------------------------------------------------------------------


def test_every_document_citation_in_the_repository_resolves():
    problems = citation_problems(ROOT)
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


def test_the_scan_sees_the_citations_it_is_meant_to_check():
    # Guards the guard: if the patterns or the file walk broke, the test above would pass on nothing.
    cites = [c for f in scanned_files(ROOT) for c in find_citations(ROOT, f)]
    reference = [c for c in cites if c.target == ROOT / "docs" / "REFERENCE.md" and c.sections]
    contracts = [c for c in cites if c.target == ROOT / "docs" / "CONTRACTS.md" and c.sections]
    assert len(reference) >= 20 and len(contracts) >= 10
    assert {s for c in reference for s in c.sections} >= {"3", "4", "5", "7", "9", "10"}
    assert any(c.file.suffix == ".py" for c in reference) and any(c.file.suffix == ".md" for c in reference)
    assert heading_numbers((ROOT / "docs" / "REFERENCE.md").read_text()) >= {str(n) for n in range(1, 12)}


# --- the checker, on a planted repository ---------------------------------------------------------------------

S = "\u00a7"  # spelled out (and MD below) so that the planted examples are not citations of this repository
MD = ".md"


def _plant(root: Path, lines: list[str]) -> None:
    (root / "docs").mkdir()
    (root / "src").mkdir()
    (root / "docs" / "REFERENCE.md").write_text("# ref\n\n## 1. One\ntext\n## 2. Two\n### 2.1 Two-one\n")
    (root / "docs" / "CONTRACTS.md").write_text("# contracts\n## 1. Recipe\n### 1.1 Schedule\n## 4. Eval\n"
                                                "### 4.1 Gates\n")
    (root / "src" / "mod.py").write_text("\n".join(lines) + "\n")


def test_heading_numbers():
    text = "# title\n## 1. What\n### 1.1 Schedule\n## 10. Ten (x)\n#### 4.2.1. deep\nnot ## 5. a heading\n## 6\n"
    assert heading_numbers(text) == {"1", "1.1", "10", "4.2.1", "6"}


def test_planted_bad_citations_are_named_by_file_and_line(tmp_path: Path):
    _plant(tmp_path, [
        f'"""Good: REFERENCE {S}1, REFERENCE.md {S}2.1, CONTRACTS {S}1, {S}4 and docs/CONTRACTS.md {S}4.1."""',
        f"# bad section: REFERENCE {S}12",  # 2
        f"# bad subsection: REFERENCE.md {S}2.3",  # 3
        f"# bad continuation: CONTRACTS {S}1, {S}7",  # 4
        f"# missing doc: docs/NOWHERE{MD}",  # 5
        f"# missing doc with section: GHOST{MD} {S}1",  # 6
        f"# not a citation of ours: Llama 3 {S}3.1.3, {S}99, REFERENCES, docs/REFERENCE.md",  # 7
        f"# range: CONTRACTS.md {S}1–1.2",  # 8
    ])
    problems = citation_problems(tmp_path, ("src", "docs"))
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [2, 3, 4, 5, 6, 8], problems
    assert all(p.startswith("src/mod.py:") for p in problems)
    joined = "\n".join(problems)
    assert f"REFERENCE {S}12" in joined and f"{S}2.3" in joined and f"{S}7" in joined and f"{S}1.2" in joined
    assert f"docs/NOWHERE{MD}" in joined and f"GHOST{MD}" in joined


def test_markdown_links_and_sections_after_them(tmp_path: Path):
    _plant(tmp_path, ["x = 1"])
    (tmp_path / "docs" / f"GUIDE{MD}").write_text(
        f"See [the contract](CONTRACTS.md) {S}4–4.1 and [ref](REFERENCE.md#1-one).\n"
        f"Broken: [gone](GONE{MD}).\n"
        f"Bad section: [CONTRACTS.md](CONTRACTS.md) {S}9.\n"
        "External: [x](https://example.com/README.md).\n"
    )
    problems = citation_problems(tmp_path, ("docs",))
    assert sorted(p.split(":")[1] for p in problems) == ["2", "3"], problems
    assert f"GONE{MD}" in problems[0] and f"{S}9" in problems[1]


def test_a_missing_reference_document_is_reported(tmp_path: Path):
    _plant(tmp_path, [f"# REFERENCE {S}1"])
    (tmp_path / "docs" / "REFERENCE.md").unlink()
    assert citation_problems(tmp_path, ("src",)) == ["src/mod.py:1: cites REFERENCE, which is not in the repository"]
