"""The house's import rules (docs/ARCHITECTURE.md), checked by parsing every module's imports — function-local ones
included, since a lazy import is still an arrow: no cycles, no import of another module's underscore names, and the
layers point one way (train/ knows nothing of run/, eval/ nothing of train/, config/ nothing that imports torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# package prefix -> packages it must not import (directly or through function-local imports)
FORBIDDEN = {
    "midtrain.train": ("midtrain.run", "midtrain.cli"),
    "midtrain.eval": ("midtrain.train", "midtrain.run", "midtrain.cli"),
    "midtrain.config": ("midtrain.train", "midtrain.run", "midtrain.cli", "midtrain.model", "midtrain.data"),
    "midtrain.data": ("midtrain.train", "midtrain.run", "midtrain.cli", "midtrain.model", "midtrain.context"),
    "midtrain.model": ("midtrain.train", "midtrain.run", "midtrain.cli"),
    "midtrain.context": ("midtrain.train", "midtrain.run", "midtrain.cli", "midtrain.data"),
    "midtrain.layout": ("midtrain.",),
    "midtrain.report": ("midtrain.train", "midtrain.run", "midtrain.cli"),
}


def module_files(src: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import of a package module in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    root = next(iter(modules)).split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.split(".")[0] == root:
                continue
            for alias in node.names:
                target = owner(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else owner(base)
                if target:
                    found.append((target, "" if f"{base}.{alias.name}" in modules else alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root and owner(alias.name):
                    found.append((owner(alias.name), "", node.lineno))
    return found


def graph(src: Path, package: str) -> dict[str, list[tuple[str, str, int]]]:
    modules = module_files(src, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, list[tuple[str, str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _, _ in edges.get(v, ()) if t != v}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def underscore_imports(edges) -> list[str]:
    return [f"{m} imports {name} from {target} (line {line})" for m, found in edges.items()
            for target, name, line in found if name.startswith("_") and not name.startswith("__") and target != m]


def layer_violations(edges) -> list[str]:
    out = []
    for module, found in edges.items():
        for prefix, banned in FORBIDDEN.items():
            if module != prefix and not module.startswith(prefix + "."):
                continue
            for target, _, line in found:
                if any(target == b.rstrip(".") or target.startswith(b if b.endswith(".") else b + ".")
                       for b in banned) and target != module:
                    out.append(f"{module} (line {line}) imports {target}")
    return out


def test_no_import_cycles():
    assert cycles(graph(SRC, "midtrain")) == []


def test_no_module_imports_another_modules_underscore_names():
    assert underscore_imports(graph(SRC, "midtrain")) == []


def test_layers_point_one_way():
    assert layer_violations(graph(SRC, "midtrain")) == []


def test_config_and_layout_import_without_torch():
    code = "import sys, midtrain.config, midtrain.layout, midtrain.config.base_ref; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_importing_the_model_package_changes_nothing_in_transformers():
    code = ("from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A; before = dict(A._global_mapping); "
            "import midtrain.model; print(dict(A._global_mapping) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_the_checks_catch_a_planted_cycle_underscore_import_and_layer_breach(tmp_path):
    pkg = tmp_path / "midtrain"
    for sub in ("train", "run", "eval"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("def f():\n    from midtrain.run.stage import _helper\n")
    (pkg / "run" / "stage.py").write_text("from midtrain.train import loop\n\ndef _helper():\n    pass\n")
    (pkg / "eval" / "ok.py").write_text("from . import other\n")
    (pkg / "eval" / "other.py").write_text("import midtrain.train.loop\n")
    edges = graph(tmp_path, "midtrain")
    assert cycles(edges) == [["midtrain.run.stage", "midtrain.train.loop"]]
    assert underscore_imports(edges) == ["midtrain.train.loop imports _helper from midtrain.run.stage (line 2)"]
    assert sorted(layer_violations(edges)) == ["midtrain.eval.other (line 1) imports midtrain.train.loop",
                                               "midtrain.train.loop (line 2) imports midtrain.run.stage"]
    assert ("midtrain.eval.other", "", 1) in edges["midtrain.eval.ok"]
