"""The run layer stays readable and the run directory has one owner: no function in run/ over 80 lines, and each
run-directory path spelled in midtrain.layout only (code elsewhere asks RunLayout / StageLayout for it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "midtrain"

# How the run directory's own names look when spelled as a path part in code (docs/CONTRACTS.md §5).
RUN_DIR_SPELLINGS = [
    r'"metrics\.jsonl"', r'"plan\.json"', r'"recipe\.yaml"', r"recipe\.prev-", r'-before\.json"', r"\.raw\.json",
    r'"checkpoints"', r'/ "stages"', r'"stages" /', r'/ "eval"', r'"eval" /', r'"hf-raw"', r'"report\.(html|md)"',
    r'"seed-', r"gate-failed-", r"\.midtrain\.lock", r'/ "plots"', r'/ "profile"', r'/ "tensorboard"',
]


def long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def path_spellings(root: Path, owner: Path) -> list[str]:
    pattern = re.compile("|".join(RUN_DIR_SPELLINGS))
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == owner:
            continue
        text = path.read_text()
        skip = docstring_lines(ast.parse(text))
        for number, line in enumerate(text.splitlines(), 1):
            if number not in skip and pattern.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_function_in_run_is_over_80_lines():
    assert [f for path in sorted((SRC / "run").glob("*.py")) for f in long_functions(path, 80)] == []


def test_run_directory_paths_are_spelled_in_layout_only():
    assert path_spellings(SRC, SRC / "layout.py") == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    (tmp_path / "layout.py").write_text('METRICS = "metrics.jsonl"\n')
    (tmp_path / "report.py").write_text('rows = run_dir / "metrics.jsonl"\nstage = run_dir / "eval" / name\n'
                                        '# run_dir / "plan.json" in a comment is fine\n'
                                        'def f():\n    """Reads run_dir / "plan.json"."""\n')
    assert path_spellings(tmp_path, tmp_path / "layout.py") == [
        'report.py:1: rows = run_dir / "metrics.jsonl"', 'report.py:2: stage = run_dir / "eval" / name']
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 81)
    assert long_functions(tmp_path / "long.py", 80) == ["long.py:1 f (82 lines)"]
