"""config/ and plan know nothing of torch: loading, checking and planning a recipe imports no training stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LADDER = Path(__file__).resolve().parents[2] / "recipes" / "ladder.yaml"


def test_loading_and_planning_a_recipe_imports_no_torch():
    probe = (
        "import sys\n"
        "from midtrain.config import load_recipe\n"
        "from midtrain.plan import build_plan\n"
        f"plan = build_plan(load_recipe({str(LADDER)!r}, check_paths=False))\n"
        "assert plan.stages\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout and "transformers" not in out.stdout, out.stdout
