"""Writes docs/MODELS.md's support table from a test run of the model families.

    python scripts/family_support.py                 # runs the family tests, then rewrites the table
    python scripts/family_support.py --junit r.xml   # from an earlier `pytest ... --junitxml r.xml`

Rows are the families of tests/model/families.py. "packed = alone", "two-stage run + export" and "distributed"
are the outcomes of tests/model/test_families.py and tests/train/test_distributed_families.py for that family; the
RoPE column tries every midtrain method on the family's tiny model through `apply_rope`, whose last step is the
family's own transformers config validation, so a method shows as accepted only where transformers takes it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.model.families: the catalog the tests use

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from midtrain.context.apply import apply_rope  # noqa: E402
from midtrain.context.methods import RotarySpec  # noqa: E402
from midtrain.io import write_text_atomic  # noqa: E402
from midtrain.model.families import choose_attention, packing_mode  # noqa: E402
from tests.model.families import FAMILIES, tiny_config  # noqa: E402

TESTS = ["tests/model/test_families.py", "tests/train/test_distributed_families.py"]
BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
L0 = 64


def method_settings(config) -> dict[str, dict]:
    """One representative setting per midtrain method, for this config's rotary dimensions."""
    try:
        half = RotarySpec.from_config(config).dim // 2
    except (ValueError, AttributeError):  # per-layer-type RoPE: longrope is refused there anyway
        half = 8
    original = {"original_max_position_embeddings": L0}
    return {
        "linear": {"method": "linear", "factor": 2},
        "ntk": {"method": "ntk", "factor": 2},
        "abf": {"method": "abf", "rope_theta": 5e5},
        "yarn": {"method": "yarn", "factor": 2, **original},
        "llama3": {"method": "llama3", "factor": 2, **original},
        "longrope": {"method": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half, **original},
    }


def accepted_methods(model_type: str) -> str:
    config = tiny_config(model_type, max_position_embeddings=L0)
    accepted = []
    for name, setting in method_settings(config).items():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:
            apply_rope(model, setting)
        except (ValueError, KeyError):
            continue
        accepted.append(name)
    return ", ".join(accepted) if accepted else "none (no rotary embedding)"


def outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """{family: {test function: passed|failed|skipped}} from a junit xml."""
    found: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.match(r"(test_\w+)\[([^\]-]+)", case.get("name", ""))
        if not match:
            continue
        test, family = match.groups()
        if "distributed" in case.get("classname", ""):
            test = f"distributed:{test}"
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        elif case.find("skipped") is not None:
            state = "skipped"
        found.setdefault(family, {})[test] = state
    return found


def mark(states: list[str]) -> str:
    if not states:
        return "–"
    return "✓" if all(s == "passed" for s in states) else ("✗" if "failed" in states else "skipped")


def table(results: dict[str, dict[str, str]]) -> str:
    rows = ["| family (`model_type`) | class | attention (auto) | packed rows | packed = alone | two-stage run + "
            "export parity | RoPE methods accepted | DDP / FSDP2 (2 ranks) |",
            "|---|---|---|---|---|---|---|---|"]
    for model_type in FAMILIES:
        config = tiny_config(model_type)
        tests = results.get(model_type, {})
        cls = AutoModelForCausalLM.from_config(config).__class__.__name__
        distributed = [s for t, s in tests.items() if t.startswith("distributed:")]
        rows.append(" | ".join([
            f"| `{model_type}`", f"`{cls}`", choose_attention(config).implementation, packing_mode(config, 64),
            mark([tests[t] for t in tests if t.startswith("test_packed")]),
            mark([tests[t] for t in tests if t.startswith("test_two_stage")]),
            accepted_methods(model_type), mark(distributed) if distributed else "layers found; no 2-rank run",
        ]) + " |")
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    return "\n".join([f"Written by `python scripts/family_support.py` ({versions}).", "", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="results of an earlier run of the family tests")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "MODELS.md")
    args = parser.parse_args()
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "families.xml"
        print(f"test results: {junit}")
        tests = [t for t in TESTS if (ROOT / t).is_file()]
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                        f"--junitxml={junit}"], cwd=ROOT, check=False)
    text = args.doc.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.doc}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(args.doc, f"{head}{BEGIN}\n{table(outcomes(junit))}\n{END}{tail}")
    print(f"wrote the support table of {len(FAMILIES)} families to {args.doc}")


if __name__ == "__main__":
    main()
