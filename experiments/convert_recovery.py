"""Architecture conversion at toy scale: drift right after GQA pooling / MoE upcycling and the loss recovery after it.

    python experiments/convert_recovery.py [--out experiments/results] [--quick]

1. Base: a tiny Llama (hidden 128, 2 layers, 4 heads of 32 with 4 kv heads = MHA, byte vocabulary) pretrained by
   `midtrain run` on Python's bundled help texts (pydoc_data, offline) for PRETRAIN tokens.
2. Each variant is the same recipe with a second stage `continue` (same data, constant LR, CONTINUE tokens) whose
   `convert` is: none (dense baseline), gqa 2 kv heads, gqa 1 kv head, moe 4 experts top-2 (aux coef 0.01). The
   variants copy the finished pretrain stage, so they start from the same weights, optimizer state (the moments of
   converted parameters restart) and data position, and see the same tokens.
3. Reported: the conversion's drift on a held-out batch (relative logits error; the `convert` row of metrics.jsonl),
   held-out loss before the conversion, right after it, along the continuation (`eval.every_tokens`) and at the end.
Writes convert_recovery.json and convert_recovery.md (the table in docs/CONVERSION.md). fp32, one thread: tiny
matmuls gain nothing from a second thread, and on shared cores OpenMP spinning makes two far slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from midtrain.config import load_recipe
from midtrain.data import byte_tokenizer
from midtrain.io import write_json_atomic, write_text_atomic
from midtrain.layout import RunLayout
from midtrain.model import build_model, count_parameters, preset_config, save_hf_checkpoint
from midtrain.run import RunOptions, run

VARIANTS = {
    "dense": None,
    "gqa-2": "{kind: gqa, num_key_value_heads: 2}",
    "gqa-1": "{kind: gqa, num_key_value_heads: 1}",
    "moe-4x2": "{kind: moe, num_experts: 4, top_k: 2, router_aux_loss_coef: 0.01}",
}

RECIPE = """\
base: {base}
tokenizer: bytes
seed: 0
precision: fp32
sources:
  - {{name: pydoc, path: {data}, holdout_docs: 12}}
checkpoint: {{keep_last: 1}}
stages:
  - name: pretrain
    init: weights
    tokens: {pretrain}
    seq_len: 256
    batch: {{tokens: 4096}}
    schedule: {{kind: cosine, peak_lr: 3e-3, min_lr: 1e-3, warmup_tokens: 40960}}
    data: {{mixture: {{pydoc: 1}}}}
    eval: {{max_docs: 12}}
"""

CONTINUE = """\
  - name: continue
    init: weights+optimizer
    tokens: {tokens}
    seq_len: 256
    batch: {{tokens: 4096}}
    schedule: {{kind: constant, peak_lr: 1e-3}}
    data: {{mixture: {{pydoc: 1}}}}
    eval: {{max_docs: 12, every_tokens: {every}}}
"""


def write_inputs(work: Path, pretrain: int, continue_tokens: int) -> tuple[Path, Path]:
    """The corpus (one document per help topic), the MHA base checkpoint, and the pretrain-only recipe."""
    import pydoc_data.topics

    data = work / "pydoc.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(pydoc_data.topics.topics.items())))
    tokenizer = byte_tokenizer()
    config = preset_config("tiny-llama", vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=4,
                           head_dim=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    base = save_hf_checkpoint(build_model(config, seed=0), tokenizer, work / "base")
    text = RECIPE.format(base=base, data=data, pretrain=pretrain)
    (work / "pretrain.yaml").write_text(text)
    (work / "continue.yaml").write_text(text + CONTINUE.format(tokens=continue_tokens, every=continue_tokens // 4))
    return work / "pretrain.yaml", work / "continue.yaml"


def run_quiet(recipe: Path, run_dir: Path, overrides: list[str]) -> None:
    run(load_recipe(recipe, [f"run_dir={run_dir}", *overrides]), RunOptions(progress=False))


def read_variant(run_dir: Path) -> dict:
    layout = RunLayout(run_dir)
    rows = [json.loads(line) for line in layout.metrics.read_text().splitlines()]
    evals = {p.stem: json.loads(p.read_text())["metrics"]["loss"] for p in layout.eval_files()}
    convert = next((r for r in rows if r["event"] == "convert"), {})
    curve = [(r["stage_tokens"], r["val_loss"]) for r in rows if r["event"] == "val" and r["stage"] == "continue"]
    train = [r for r in rows if r["event"] == "train" and r["stage"] == "continue"]
    config = json.loads((layout.stage("continue").export / "config.json").read_text())
    from midtrain.model import load_model

    params = count_parameters(load_model(layout.stage("continue").export))
    return {
        "architecture": config["architectures"][0],
        "kv_heads": config["num_key_value_heads"],
        "experts": config.get("num_local_experts"),
        "params_non_embedding": params["non_embedding"],
        "rel_logits_error": convert.get("rel_logits_error", 0.0),
        "loss_pre": evals["pretrain"],
        "loss_converted": evals["continue-before"],
        "curve": [[0, evals["continue-before"]], *curve, [train[-1]["stage_tokens"], evals["continue"]]],
        "loss_end": evals["continue"],
        "aux_loss_last": train[-1].get("aux_loss"),
    }


def table(results: dict, meta: dict) -> str:
    points = [t for t, _ in results["dense"]["curve"]]
    head = " | ".join(f"@{t // 1000}k" for t in points[1:])
    lines = [
        f"Base: {meta['base']}; pretrain {meta['pretrain']:,} tokens, then {meta['continue']:,} tokens of the same "
        "data at constant LR 1e-3. Held-out loss (nats/byte) on 12 pydoc topics never trained on.",
        "",
        f"| variant | non-emb. params | drift (rel. logits err.) | loss before | after conversion | {head} |",
        "|---|---|---|---|---|" + "---|" * (len(points) - 1),
    ]
    for name, r in results.items():
        curve = " | ".join(f"{loss:.4f}" for _, loss in r["curve"][1:])
        lines.append(f"| {name} | {r['params_non_embedding']:,} | {r['rel_logits_error']:.2e} | {r['loss_pre']:.4f} | "
                     f"{r['loss_converted']:.4f} | {curve} |")
    lines += ["", f"`python experiments/convert_recovery.py{' --quick' if meta['quick'] else ''}`: "
              f"{meta['seconds']:.0f} s on {meta['threads']} CPU thread(s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "convert_recovery")
    parser.add_argument("--quick", action="store_true", help="a smoke run: ~6x fewer tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    pretrain, cont = (48 * 4096, 16 * 4096) if args.quick else (320 * 4096, 96 * 4096)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ["MIDTRAIN_CACHE"] = str(args.work / "cache")
    pretrain_recipe, continue_recipe = write_inputs(args.work, pretrain, cont)

    shared = args.work / "pretrained"
    run_quiet(pretrain_recipe, shared, [])
    results = {}
    for name, convert in VARIANTS.items():
        run_dir = args.work / name
        shutil.copytree(shared, run_dir)  # the finished pretrain stage is skipped: every variant starts from it
        overrides = [f"stages.continue.convert={convert}"] if convert else []
        run_quiet(continue_recipe, run_dir, overrides)
        results[name] = read_variant(run_dir)
        print(f"{name}: {results[name]['loss_converted']:.4f} -> {results[name]['loss_end']:.4f}", flush=True)
    meta = {"base": "tiny-llama, 4 heads x 32, 4 kv heads, byte vocab (259)", "pretrain": pretrain, "continue": cont,
            "quick": args.quick, "seconds": time.time() - start, "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "convert_recovery.json", {"meta": meta, "results": results})
    write_text_atomic(args.out / "convert_recovery.md", table(results, meta))
    print(table(results, meta))


if __name__ == "__main__":
    main()
