"""`midtrain eval CHECKPOINT`: any evaluation on its own, with the same metric names and JSON as stage evals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from midtrain.cli.common import EXIT_RECIPE, EXIT_RUN, ThreadsOpt, console, escape, fail, parse_threads


def _csv(text: str, kind: type, what: str) -> list:

    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        fail(f"{what} {text!r}: expected comma-separated {kind.__name__} values", EXIT_RECIPE)
        raise  # unreachable: fail exits


def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A Hugging Face checkpoint dir (e.g. RUN/stages/<stage>/hf).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: loss, ppl, passkey, niah, ruler, ruler.<task>, arith, "
                                            "harness:<lm-eval task>.")] = "passkey,niah,arith",
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated (ppl, passkey, niah, "
                                              "ruler).")] = "",
    samples: Annotated[int, typer.Option(min=1, help="Prompts per task and length (NIAH: per depth).")] = 10,
    depths: Annotated[str, typer.Option(help="NIAH depths in [0, 1], comma-separated.")] = "0,0.25,0.5,0.75,1",
    haystack: Annotated[str, typer.Option(help="noise, pydoc, or a local .txt/.jsonl file or dir.")] = "pydoc",
    seed: Annotated[int, typer.Option(help="Seed of the generated tasks.")] = 0,
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", help="Held-out text (.jsonl/.txt file or dir) for loss and ppl; repeatable, one domain each.",
        show_default=False)] = None,
    max_docs: Annotated[int, typer.Option(min=1, help="Documents read per --data path.")] = 64,
    seq_len: Annotated[int, typer.Option(min=16, help="Row length for the held-out loss.")] = 1024,
    precision: Annotated[str, typer.Option(help="fp32 or bf16-mixed.")] = "fp32",
    out: Annotated[Optional[Path], typer.Option(help="Write the results JSON here (docs/CONTRACTS.md §4).")] = None,
    harness_include: Annotated[Optional[list[Path]], typer.Option(
        "--harness-include", help="A directory of lm-eval task YAMLs (local data files); repeatable.",
        show_default=False)] = None,
    harness_limit: Annotated[Optional[int], typer.Option(min=1, help="Examples per harness task (all if unset).")
                             ] = None,
    harness_batch_size: Annotated[int, typer.Option(min=1, help="Harness requests per forward.")] = 16,
    threads: ThreadsOpt = None,
) -> None:
    """Evaluate a checkpoint: held-out loss, perplexity vs length, passkey, NIAH, RULER-style, arithmetic."""
    import json

    from rich.table import Table

    from midtrain.eval.gates import LENGTH_TASKS, ruler_tasks_of
    from midtrain.eval.suite import EvalSpec
    from midtrain.eval.tasks.haystack import haystack_sentences

    if precision not in ("fp32", "bf16-mixed"):
        fail(f"--precision {precision!r}: expected fp32 or bf16-mixed", EXIT_RECIPE)
    try:
        spec = EvalSpec(tasks=tuple(_csv(tasks, str, "--tasks")), lengths=tuple(_csv(lengths, int, "--lengths")),
                        samples=samples, depths=tuple(_csv(depths, float, "--depths")), haystack=haystack, seed=seed,
                        harness_include=tuple(str(p.resolve()) for p in harness_include or []),
                        harness_limit=harness_limit, harness_batch_size=harness_batch_size)
        if any(not 0 <= d <= 1 for d in spec.depths):
            raise ValueError(f"--depths {depths!r}: every depth must lie in [0, 1]")
        needs_lengths = [t for t in spec.tasks if t in LENGTH_TASKS]
        if needs_lengths and not spec.lengths:
            raise ValueError(f"tasks {needs_lengths} need --lengths (e.g. --lengths 1024,4096)")
        if ("loss" in spec.tasks or "ppl" in spec.tasks) and not data:
            raise ValueError("loss and ppl need held-out text: --data FILE (jsonl or txt)")
        if "niah" in spec.tasks or ruler_tasks_of(spec.tasks):
            haystack_sentences(haystack)
    except ValueError as exc:
        fail(escape(str(exc)), EXIT_RECIPE)
    if not spec.tasks:
        fail("--tasks: no task to evaluate (e.g. --tasks passkey,niah --lengths 1024)", EXIT_RECIPE)
    for path in harness_include or []:
        if not path.is_dir():
            fail(escape(f"--harness-include {path}: not a directory of task YAMLs"), EXIT_RECIPE)
    for path in data or []:  # at the edge: a missing file is one line, not a traceback around the reader's error
        if not path.exists():
            fail(escape(f"--data {path}: no such file or directory"), EXIT_RECIPE)
    if not checkpoint.is_dir():
        fail(escape(f"{checkpoint}: no such checkpoint directory"), EXIT_RECIPE)
    from midtrain.data import DataError
    from midtrain.threads import apply_threads

    chosen = apply_threads(parse_threads(threads) or "auto")
    console.print(f"threads: {chosen.threads} ({chosen.why})", highlight=False)
    try:
        result = _evaluate_checkpoint(checkpoint, spec, data or [], max_docs, seq_len, precision,
                                      out_dir=None if out is None else out.with_suffix(""))
    except (FileNotFoundError, RuntimeError, ValueError, DataError) as exc:
        fail(escape(str(exc)), EXIT_RUN)
    table = Table(title=f"{checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    for key, why in result["details"].get("skipped", {}).items():
        console.print(f"[yellow]skipped[/] {escape(key)}: {escape(why)}")
    if out is not None:
        from midtrain.io import write_text_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        console.print(f"results: {out}")


def _evaluate_checkpoint(checkpoint: Path, spec, data: list[Path], max_docs: int, seq_len: int,
                         precision: str, out_dir: Path | None = None) -> dict:
    """Loads the checkpoint (and --data), runs the spec, returns the eval-results object."""
    import json

    import numpy as np
    import torch

    from midtrain.data.sources import iter_documents
    from midtrain.eval.heldout import heldout_metrics, pack_documents
    from midtrain.eval.suite import evaluate
    from midtrain.model import forward_packed, load_model, load_tokenizer

    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    docs: list[tuple[np.ndarray, int]] = []
    domains = []
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, path in enumerate(data):
        domains.append(path.stem.split(".")[0])
        for n, doc in enumerate(iter_documents(path)):
            if n == max_docs:
                break
            ids = head + list(tokenizer(doc.text, add_special_tokens=False)["input_ids"]) + tail
            docs.append((np.asarray(ids, dtype=np.int64), i))
    metrics: dict[str, float] = {}
    if "loss" in spec.tasks:
        metrics = heldout_metrics(model, forward_packed, pack_documents(docs, seq_len), domains, device=device,
                                  precision=precision)
    more, details = evaluate(model, tokenizer, spec, documents=[d for d, _ in docs], checkpoint_dir=checkpoint,
                             precision=precision, log=lambda msg: print(msg, flush=True),
                             out_dir=out_dir)
    metrics.update(more)
    info_file = checkpoint / "midtrain.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return {"stage": info.get("stage"), "when": "standalone", "step": info.get("global_step"),
            "tokens": info.get("tokens"), "checkpoint": str(checkpoint), "metrics": dict(sorted(metrics.items())),
            "details": details}
