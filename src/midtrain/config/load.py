"""Recipe files: YAML with line numbers, `--set` overrides, and errors a person can act on.

Every problem is reported as `FILE:LINE: field.path: what was expected (got VALUE)`; stage and source list
indices are shown by name (`stages.anneal.batch.tokens`), because that is how users address them.
"""

from __future__ import annotations

import glob
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from midtrain.config.base_ref import BaseRef
from midtrain.config.checks import recipe_problems, unknown_mixture_sources
from midtrain.config.recipe import NAME_RE, Recipe

Loc = tuple[str | int, ...]


class RecipeError(Exception):
    """One or more problems with a recipe; `str()` is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------- YAML with line numbers


def _line_map(text: str) -> dict[Loc, int]:
    """Maps each key path in a YAML document to its 1-based line."""
    lines: dict[Loc, int] = {}

    seen: set[int] = set()

    def walk(node: yaml.Node, path: Loc) -> None:
        lines[path] = node.start_mark.line + 1
        if id(node) in seen:  # an alias: its own lines were recorded where it was anchored
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, key.value)
                walk(value, child)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


MAX_YAML_NODES = 100_000


def _expanded_size(root: yaml.Node | None) -> int:
    """Nodes of the document with every alias expanded (a shared node counts each time it is used)."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = 1  # a recursive alias counts once
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(item) for item in node.value)
        else:
            n = 1
        memo[id(node)] = n
        return n

    return size(root) if root is not None else 0


def _read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{path}: recipe file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{path}: cannot read recipe ({exc})"]) from None
    try:
        size = _expanded_size(yaml.compose(text))
        if size > MAX_YAML_NODES:  # checked before anything walks the tree: a few aliases can expand exponentially
            raise RecipeError([f"{path}: the recipe expands to {size:,} YAML nodes through anchors/aliases "
                               f"(limit {MAX_YAML_NODES:,})"])
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}: invalid YAML: {problem}"]) from None
    except RecursionError:
        raise RecipeError([f"{path}: YAML nested too deeply"]) from None
    if not isinstance(data, dict):
        got = type(data).__name__
        raise RecipeError([f"{path}:1: the recipe must be a mapping of keys (base, stages, ...), got {got}"])
    return data, lines


# --------------------------------------------------------------------------- overrides


def _list_index(items: list, key: str, where: str) -> int:
    """Finds a list element by its `name` (stages and sources are addressed by name), else by integer index."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
        return int(key) % len(items)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise RecipeError([f"--set {where}: no entry named {key!r} (names: {names})"])


def apply_overrides(data: dict, overrides: list[str]) -> list[Loc]:
    """Applies `a.b=c` overrides in place (values parsed as YAML); returns the paths they set."""
    touched: list[Loc] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([f"--set {item!r}: expected KEY=VALUE, e.g. stages.anneal.tokens=2e6"])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        loc: list[str | int] = []
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                loc.append(idx)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                loc.append(part)
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError([f"--set {key}: {'.'.join(parts[:j])} is a value, not a mapping"])
        touched.append(tuple(loc))
    return touched


# --------------------------------------------------------------------------- error formatting


def _display_path(loc: Loc, data: Any) -> str:
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            item = node[part]
            name = item.get("name") if isinstance(item, dict) else None
            parts.append(name if isinstance(name, str) and NAME_RE.match(name) else str(part))
            node = item
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _data_loc(loc: Loc, data: Any) -> Loc:
    """Drops pydantic's type tags (`float`, `literal[...]`) that are not keys of the document."""
    kept: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            kept.append(part)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            kept.append(part)
            node = node[part] if 0 <= part < len(node) else None
        else:
            break
        if node is None:
            break
    return tuple(kept)


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model describing the mapping at `loc`, to list the keys it allows."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _format(file: Path, lines: dict[Loc, int], overridden: list[Loc], data: Any, loc: Loc, msg: str) -> str:
    where = str(file)
    if any(loc[: len(o)] == o for o in overridden):
        msg += " [set by --set]"
    else:
        probe = loc
        while probe and probe not in lines:
            probe = probe[:-1]
        if probe in lines:
            where += f":{lines[probe]}"
    return f"{where}: {_display_path(loc, data)}: {msg}"


def _error_problems(error: dict, loc: Loc) -> list[tuple[Loc, str]]:
    """(field path, message) of one pydantic error; a field parsed by its own parser (type "issues", e.g. a stage's
    `rope`) reports several problems below the field, each with its own path."""
    if error["type"] == "issues":
        return [((*loc, *path), msg) for path, msg in error["ctx"]["issues"]]
    return [(loc, _pydantic_message(error, loc))]


def _pydantic_message(error: dict, loc: Loc) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key{allowed}"
    if kind == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ")
    value = error.get("input")
    if kind not in ("value_error",) and not isinstance(value, (dict, list)):
        msg += f" (got {value!r})"
    return msg


# --------------------------------------------------------------------------- public entry points


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_paths: bool = True) -> Recipe:
    """Reads, overrides, validates and resolves a recipe. Raises RecipeError listing every problem found."""
    file = Path(path)
    data, lines = _read_yaml(file)
    try:
        overridden = apply_overrides(data, list(overrides or []))
    except RecipeError as exc:
        raise RecipeError([f"{file}: {problem}" for problem in exc.problems]) from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        found: list[tuple[Loc, str]] = []
        for error in exc.errors():
            found += _error_problems(error, _data_loc(tuple(error["loc"]), data))
        # A schema error elsewhere must not hide a missing file or an unknown source name: report them in one go.
        seen = {loc for loc, _ in found}
        found += [(loc, msg) for loc, msg in _raw_problems(data, file.parent, check_paths) if loc not in seen]
        raise RecipeError([_format(file, lines, overridden, data, loc, msg) for loc, msg in found]) from None
    recipe = _resolve_paths(recipe, file.parent)
    recipe, lr_problems = _resolve_start_lr_from_base(recipe)
    if lr_problems:  # the rest of validation needs a number there
        raise RecipeError([_format(file, lines, overridden, data, loc, msg) for loc, msg in lr_problems])
    problems = recipe_problems(recipe)
    if check_paths:
        problems += _path_problems(recipe)
    if problems:
        raise RecipeError([_format(file, lines, overridden, data, loc, msg) for loc, msg in problems])
    if recipe.run_dir is None:
        recipe = recipe.model_copy(update={"run_dir": Path("runs") / file.stem})
    return recipe


def _is_local(ref: str) -> bool:
    return ref != "bytes" and BaseRef.parse(ref).kind == "path"  # "bytes": the built-in byte tokenizer


def _resolve_paths(recipe: Recipe, root: Path) -> Recipe:
    """Data and checkpoint paths in a recipe are relative to the recipe file, not to the caller's cwd."""

    def resolve(p: Path | str) -> Path | str:
        if isinstance(p, str):  # an fsspec URL: nothing to resolve
            return p
        return p if p.is_absolute() else (root / p).resolve()

    update: dict[str, Any] = {"sources": [s.model_copy(update={"path": resolve(s.path)}) for s in recipe.sources]}
    if _is_local(recipe.base):
        update["base"] = str(resolve(Path(recipe.base)))
    if recipe.tokenizer and _is_local(recipe.tokenizer):
        update["tokenizer"] = str(resolve(Path(recipe.tokenizer)))
    if recipe.decontaminate is not None:
        update["decontaminate"] = recipe.decontaminate.model_copy(
            update={"benchmarks": [resolve(p) for p in recipe.decontaminate.benchmarks]})
    if recipe.curation is not None and recipe.curation.output is not None:
        update["curation"] = recipe.curation.model_copy(update={"output": resolve(recipe.curation.output)})
    update["stages"] = [stage.model_copy(update={"eval": stage.eval.model_copy(update={"harness": (
        stage.eval.harness.model_copy(update={"include": [resolve(p) for p in stage.eval.harness.include]}))})})
        for stage in recipe.stages]
    return recipe.model_copy(update=update)


def _resolve_start_lr_from_base(recipe: Recipe) -> tuple[Recipe, list[tuple[Loc, str]]]:
    """`start_lr: from_base` -> the `last_lr` the base checkpoint's midtrain.json records."""
    problems: list[tuple[Loc, str]] = []
    stages = list(recipe.stages)
    for i, stage in enumerate(stages):
        if stage.start_lr != "from_base":
            continue
        loc: Loc = ("stages", i, "start_lr")
        if i > 0:
            problems.append((loc, "from_base is for the first stage; a later stage starts from the previous stage's "
                                  "export (use from_previous)"))
            continue
        if not _is_local(recipe.base):
            problems.append((loc, f"from_base needs a local checkpoint exported by midtrain (base is {recipe.base})"))
            continue
        meta = Path(recipe.base) / "midtrain.json"
        try:
            last_lr = json.loads(meta.read_text())["last_lr"]
        except FileNotFoundError:
            problems.append((loc, f"from_base: {meta} not found (only checkpoints exported by midtrain record their "
                                  "last LR; give the number instead)"))
            continue
        except (ValueError, KeyError, TypeError, OSError) as exc:
            problems.append((loc, f"from_base: cannot read last_lr from {meta} ({type(exc).__name__}: {exc})"))
            continue
        if isinstance(last_lr, bool) or not isinstance(last_lr, (int, float)) or not last_lr >= 0:
            problems.append((loc, f"from_base: {meta} has last_lr {last_lr!r}, not a non-negative number"))
            continue
        stages[i] = stage.model_copy(update={"start_lr": float(last_lr)})
    return recipe.model_copy(update={"stages": stages}), problems


def _path_problems(recipe: Recipe) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if _is_local(recipe.base) and not (Path(recipe.base) / "config.json").is_file():
        problems.append((("base",), f"no Hugging Face checkpoint at {recipe.base} (config.json not found)"))
    if recipe.tokenizer and _is_local(recipe.tokenizer) and not Path(recipe.tokenizer).is_dir():
        problems.append((("tokenizer",), f"tokenizer directory {recipe.tokenizer} does not exist"))
    for i, source in enumerate(recipe.sources):
        if isinstance(source.path, str):  # a URL: checked when read (a clear DataError naming it)
            continue
        problems += _missing_path(i, source.path)
    return problems


def _missing_path(index: int, path: Path) -> list[tuple[Loc, str]]:
    if path.exists():
        return []
    if re.search(r"[*?[]", str(path)):  # a glob of shards (pre-tokenized sources): it must match something
        return [] if any(True for _ in glob.iglob(str(path), recursive=True)) else \
            [(("sources", index, "path"), f"{path} matches no files")]
    return [(("sources", index, "path"), f"{path} does not exist")]


def _raw_problems(data: Any, root: Path, check_paths: bool) -> list[tuple[Loc, str]]:
    """Missing source files and unknown mixture names, read from the raw mapping of a recipe that failed its schema
    (best effort: entries too malformed to read are the schema's errors already)."""
    if not isinstance(data, dict):
        return []
    problems: list[tuple[Loc, str]] = []
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    known = {s["name"] for s in sources if isinstance(s, dict) and isinstance(s.get("name"), str)}
    for i, source in enumerate(sources):
        path = source.get("path") if isinstance(source, dict) else None
        if check_paths and isinstance(path, str) and "://" not in path:
            problems += _missing_path(i, (Path(path) if Path(path).is_absolute() else root / path).resolve())
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    for i, stage in enumerate(stages):
        stage_data = stage.get("data") if isinstance(stage, dict) else None
        mixture = stage_data.get("mixture") if isinstance(stage_data, dict) else None
        if isinstance(mixture, dict) and known:
            problems += unknown_mixture_sources(("stages", i), mixture, known)
    return problems


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run dir records as recipe.yaml)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
