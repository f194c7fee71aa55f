"""Recipe names cannot escape the run dir; a local recipe never touches the network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from midtrain.config import RecipeError, load_recipe

from ..train.tiny import train_rows, write_recipe

ESCAPES = ["../../x", "..", ".", "a/b", "/abs", "..\\x", ".hidden", "x/../../y", "~", "", " ", "a\x00b", "ö/../x"]


def _recipe(tmp_path: Path, stage: str = "warm", source: str = "prose", replay: str | None = None) -> Path:
    (tmp_path / "prose.jsonl").write_text('{"text": "a b c"}\n')
    stages = [{"name": stage, "tokens": 1024, "seq_len": 64, "batch": {"tokens": 512},
               "schedule": {"kind": "constant", "peak_lr": 1e-3}, "data": {"mixture": {source: 1}}}]
    if replay is not None:
        stages.append({**stages[0], "name": "second", "data": {"mixture": {source: 1},
                                                               "replay": {"fraction": 0.5, "stage": replay}}})
    data = {"base": "preset:tiny-llama", "tokenizer": "bytes", "run_dir": str(tmp_path / "run"),
            "sources": [{"name": source, "path": "prose.jsonl"}], "stages": stages}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("where", ["stage", "source", "replay"])
def test_path_like_names_are_recipe_errors(tmp_path, name, where):
    kwargs = {"stage": {"stage": name}, "source": {"source": name}, "replay": {"replay": name}}[where]
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, **kwargs))
    assert "names may use letters, digits" in str(info.value) or "required" in str(info.value)


def test_a_name_set_from_the_command_line_is_checked_too(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.0\.name: names may use .*'\.\./\.\./x'.*\[set by --set\]"):
        load_recipe(_recipe(tmp_path), ["stages.warm.name=../../x"])


@settings(max_examples=80, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.text(max_size=12))
def test_every_accepted_name_stays_inside_the_run_dir(tmp_path, name):
    try:
        recipe = load_recipe(_recipe(tmp_path, stage=name or "x"))
    except RecipeError:
        return
    run_dir = Path(recipe.run_dir).resolve()
    for sub in ("stages", "checkpoints", "eval"):
        target = (run_dir / sub / recipe.stages[0].name).resolve()
        assert target.parent == run_dir / sub, (name, target)


@pytest.fixture()
def no_network(monkeypatch):
    """Every attempt to open an internet connection or resolve a name is recorded and fails."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(("connect", address))
            raise OSError("network disabled by the test")
        return real_connect(self, address)

    def resolve(host, *args, **kwargs):
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # midtrain must not rely on the user having set it
    return attempts


@pytest.mark.slow
def test_a_local_recipe_runs_without_touching_the_network(tmp_path, monkeypatch, no_network):
    from midtrain.run import RunOptions, run

    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, warm_tokens=1024, anneal_tokens=512, every=1024),
                         [f"run_dir={tmp_path / 'run'}", "stages.warm.eval.tasks=[loss, passkey]",
                          "stages.warm.eval.lengths=[64]", "stages.warm.eval.samples=2"])
    run(recipe, RunOptions(progress=False))
    assert len(train_rows(tmp_path / "run")) == 3 and (tmp_path / "run" / "report.md").is_file()
    assert no_network == []


@pytest.mark.parametrize("field,value", [("base", "meta-llama/Llama-3.2-1B"), ("tokenizer", "gpt2")])
def test_a_hub_looking_name_without_hub_prefix_is_a_local_path(tmp_path, no_network, field, value):
    data = yaml.safe_load(_recipe(tmp_path).read_text())
    data[field] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="does not exist|not found"):
        load_recipe(tmp_path / "recipe.yaml")
    assert no_network == []
