"""Reload HF exports in a fresh interpreter: the only honest check that plain transformers sees what we saved."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    dirs, ids_path, threads = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    ids = torch.load(ids_path)
    out = {}
    for name, d in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out[name] = {"logits": logits, "rope_parameters": model.config.rope_parameters,
                     "max_position_embeddings": model.config.max_position_embeddings,
                     "dtype": str(model.dtype), "use_cache": model.config.use_cache}
    torch.save(out, ids_path + ".reloaded.pt")
""")


def reload_in_fresh_process(dirs: dict[str, str | Path], ids: torch.Tensor, scratch: Path) -> dict[str, dict]:
    """Load each export with `AutoModelForCausalLM` in one new process; return its logits on `ids` and config facts."""
    ids_path = scratch / "ids.pt"
    torch.save(ids, ids_path)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps({k: str(v) for k, v in dirs.items()}), str(ids_path),
         str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(str(ids_path) + ".reloaded.pt")
