"""Run dir -> report.md + report.html + plots/*.png: what each stage changed, in one page a researcher can share.

Reads only files of the run-dir contract (plan.json, metrics.jsonl, eval/*.json, data/*.json), so it works on a
finished run, a stopped one (failed gate, preemption) and a copied run dir alike.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import yaml

from midtrain.eval.keys import MetricKey
from midtrain.io import write_text_atomic
from midtrain.layout import RunLayout
from midtrain.report import plots


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a run's or a seed branch's)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run
        # every row has these (CONTRACTS §3); a damaged one is left out rather than failing the whole report
        if isinstance(row, dict) and isinstance(row.get("event"), str) and isinstance(row.get("step"), int) \
                and isinstance(row.get("tokens"), (int, float)) and isinstance(row.get("stage"), str):
            rows.append(row)
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _change(before, after, key: str = "loss") -> str:
    """Losses and perplexities change relatively (−4.2%); accuracies absolutely (+0.73: a relative change of a score
    that starts near 0 says nothing)."""
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return ""
    parsed = MetricKey.try_parse(key)
    if parsed is not None and not parsed.lower_is_better:
        return f"{after - before:+.2f}"
    return f"{(after - before) / abs(before):+.1%}" if before else ""


def _rope_text(rope) -> str:
    """A stage's RoPE setting as the recipe gave it: `yarn ×4 (L0 128)`, `abf θ 5e+05`, or `as the base`."""
    if not rope:
        return "as the base"
    method = rope.get("method") or rope.get("rope_type") or "?"
    parts = [str(method)]
    if rope.get("factor") is not None:
        parts.append(f"×{float(rope['factor']):g}")
    if rope.get("rope_theta") is not None:
        parts.append(f"θ {float(rope['rope_theta']):g}")
    if rope.get("original_max_position_embeddings") is not None:
        parts.append(f"(L0 {rope['original_max_position_embeddings']})")
    extra = {k: v for k, v in rope.items() if k not in ("method", "rope_type", "factor", "rope_theta",
                                                       "original_max_position_embeddings")}
    return " ".join(parts) + ("; " + ", ".join(f"{k} {v}" for k, v in extra.items()) if extra else "")


def _stage_ropes(recipe_file: Path) -> dict[str, str]:
    try:
        recipe = yaml.safe_load(recipe_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {st.get("name"): _rope_text(st.get("rope")) for st in recipe.get("stages") or [] if isinstance(st, dict)}


def _wall_seconds(rows: list[dict], stage: str) -> float | None:
    """From the stage's first row to its stage_end (resumes included: the time it took, not the time it ran)."""
    times = [r["time"] for r in rows if r["stage"] == stage and isinstance(r.get("time"), (int, float))]
    ends = [r["time"] for r in rows if r["stage"] == stage and r["event"] == "stage_end"]
    return (ends[-1] - min(times)) if ends and times else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


class _Doc:
    """Builds the markdown and the HTML side by side from the same sections."""

    def __init__(self, title: str):
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        if not rows:
            return
        self.md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path | None, run_dir: Path, alt: str) -> None:
        if path is None:
            return
        rel = path.relative_to(run_dir).as_posix()
        self.md += [f"![{alt}]({rel})", ""]
        self.html.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(alt)}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.85em;color:#666}")


# After load the page records how many images failed to decode (naturalWidth 0): tests read it with --dump-dom.
_IMAGE_CHECK = ("<script>window.addEventListener('load',function(){var im=[].slice.call(document.images);"
                "document.body.setAttribute('data-images','broken:'+im.filter(function(i){return !i.naturalWidth})"
                ".length+' total:'+im.length);});</script>")


def write_report(run_dir: str | Path) -> Path:
    """Writes RUN/report.md, RUN/report.html and RUN/plots/*.png; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    layout = RunLayout(run_dir)
    plan = _read_json(layout.plan) or {"stages": []}
    stages = plan.get("stages", [])
    rows = _rows(layout.metrics)
    plot_dir = layout.plots
    plot_dir.mkdir(exist_ok=True)
    evals = {st["name"]: (_read_json(layout.stage(st["name"]).eval_before),
                          _read_json(layout.stage(st["name"]).eval_after)) for st in stages}

    doc = _Doc(f"midtrain report: {run_dir.name}")
    doc.para(f"{len(stages)} stage(s), {sum(s['tokens'] for s in stages):,} planned tokens; "
             f"{sum(1 for _, a in evals.values() if a)} finished.")
    ropes = _stage_ropes(layout.recipe)
    doc.table(["stage", "tokens", "steps", "seq_len", "RoPE", "init", "mixture", "lr start → end", "wall",
               "status"],
              [[st["name"], f"{st['tokens']:,}", str(st["steps"]), str(st["seq_len"]), ropes.get(st["name"], "–"),
                st["init"], ", ".join(f"{k} {v:.0%}" for k, v in st.get("mixture", {}).items()),
                f"{_fmt(_first_lr(rows, st['name']))} → {_fmt(st.get('last_lr'))}",
                _duration(_wall_seconds(rows, st["name"])), _status(evals[st["name"]])]
               for st in stages])

    doc.heading("Training")
    doc.image(plots.loss_curves(rows, stages, plot_dir / "loss.png"), run_dir, "loss per domain over tokens")
    doc.image(plots.lr_and_mixture(rows, stages, plot_dir / "lr_mixture.png"), run_dir,
              "learning rate and mixture shares over tokens")
    branches = [layout.branch(st["name"], seed) for st in stages for seed in layout.branch_seeds(st["name"])]
    gns_series = {"run": rows, **{f"{b.name} {b.dir.name}": _rows(b.metrics) for b in branches}}
    doc.image(plots.gradient_noise_scale(gns_series, stages, plot_dir / "gns.png"), run_dir,
              "gradient noise scale B_simple over tokens")
    doc.image(plots.throughput(rows, stages, plot_dir / "throughput.png"), run_dir, "tokens/s and MFU over tokens")
    _throughput_table(doc, rows, stages)

    _faults_section(doc, rows)

    doc.heading("Before / after each stage")
    for name, (before, after) in evals.items():
        if not (before or after):
            continue
        b, a = (before or {}).get("metrics", {}), (after or {}).get("metrics", {})
        start, end = (before or {}).get("checkpoint", "?"), (after or {}).get("checkpoint", "–")
        doc.para(f"Stage {name}: start {start} → end {end}")
        doc.table(["metric", "before", "after", "change"],
                  [[k, _fmt(b.get(k)), _fmt(a.get(k)), _change(b.get(k), a.get(k), k)] for k in sorted({*b, *a})])
        skipped = {**(before or {}).get("details", {}).get("skipped", {}),
                   **(after or {}).get("details", {}).get("skipped", {})}
        if skipped:
            doc.para("Skipped: " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))

    _variants_section(doc, run_dir, stages, evals)

    doc.heading("Gates")
    gate_rows = []
    for name, (_, after) in evals.items():
        gate = (after or {}).get("gate")
        for cond in (gate or {}).get("conditions", []):
            verdict = "pass" if cond["passed"] else ("FAIL (overridden)" if gate.get("overridden") else "FAIL")
            gate_rows.append([name, cond["metric"], cond["condition"], _fmt(cond["value"]), _fmt(cond["before"]),
                              _fmt(cond["threshold"]), verdict])
    if gate_rows:
        doc.table(["stage", "metric", "condition", "after", "before", "threshold", "outcome"], gate_rows)
    else:
        doc.para("No stage has a gate (or none has been checked yet).")

    doc.heading("Long context")
    labelled = _labelled_evals(stages, evals)
    doc.image(plots.per_length(labelled, "ppl", "perplexity", "Perplexity vs context length",
                               plot_dir / "ppl_length.png", log_y=True), run_dir, "perplexity vs context length")
    doc.image(plots.per_length(labelled, "passkey", "accuracy", "Passkey retrieval per length",
                               plot_dir / "passkey.png"), run_dir, "passkey accuracy per length")
    for label, ev in labelled.items():
        grid = ev.get("details", {}).get("niah")
        doc.image(plots.niah_heatmap(grid or {}, f"NIAH: {label}", plot_dir / f"niah_{_safe(label)}.png"), run_dir,
                  f"needle in a haystack, {label}")
    pairs = [(name, (b or {}).get("metrics", {}), (a or {}).get("metrics", {})) for name, (b, a) in evals.items()
             if a or b]
    doc.image(plots.task_bars(pairs, plot_dir / "tasks.png"), run_dir, "task scores before and after each stage")

    _data_section(doc, run_dir)
    write_text_atomic(layout.report_md, "\n".join(doc.md) + "\n")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>midtrain report: {html.escape(run_dir.name)}"
            f"</title><style>{_CSS}</style></head><body>" + "\n".join(doc.html) + _IMAGE_CHECK + "</body></html>\n")
    write_text_atomic(layout.report_html, page)
    return layout.report_html


def _throughput_table(doc: _Doc, rows: list[dict], stages: list[dict]) -> None:
    """Median tokens/s, model TFLOP/s and MFU of each stage's steps (the first step of a stage, which pays for
    warm-up, is left out when there are others)."""
    table = []
    for st in stages:
        steps = [r for r in rows if r.get("event") == "train" and r.get("stage") == st["name"]]
        steps = steps[1:] if len(steps) > 1 else steps
        if not steps:
            continue
        mfu = _median(steps, "mfu")
        table.append([st["name"], str(st["seq_len"]), f"{_median(steps, 'tokens_per_s'):,.0f}",
                      _fmt(_median(steps, "model_tflops_per_s")), "–" if mfu is None else f"{mfu:.1%}"])
    if table:
        doc.table(["stage", "seq_len", "tokens/s (median)", "model TFLOP/s", "MFU"], table)


def _median(rows: list[dict], key: str) -> float | None:
    values = sorted(r[key] for r in rows if key in r)
    return values[len(values) // 2] if values else None


def _first_lr(rows: list[dict], stage: str) -> float | None:
    return next((r["lr"] for r in rows if r.get("event") == "stage_start" and r.get("stage") == stage), None)


def _status(pair: tuple[dict | None, dict | None]) -> str:
    before, after = pair
    if after is None:
        return "started" if before else "pending"
    gate = after.get("gate")
    if not gate:
        return "done"
    if gate["passed"]:
        return "done, gate passed"
    return "gate failed (overridden)" if gate.get("overridden") else "gate FAILED"


def _labelled_evals(stages: list[dict], evals: dict) -> dict[str, dict]:
    """Each stage's start and end, in order: a later stage's start is the previous end under its own RoPE setting and
    lengths (the context-extension stage's "before" point), so it is a point of its own."""
    out = {}
    for i, st in enumerate(stages):
        before, after = evals[st["name"]]
        if before:
            out[f"start ({st['name']} before)" if i == 0 else f"{st['name']} before"] = before
        if after:
            out[st["name"]] = after
    return out


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _data_section(doc: _Doc, run_dir: Path) -> None:
    """Curation/decontamination/tokenization summaries written under RUN/data by the data pipeline, if any."""
    data_dir = RunLayout(run_dir).data
    files = sorted(data_dir.glob("*.json")) if data_dir.is_dir() else []
    if not files:
        return
    doc.heading("Data")
    for file in files:
        data = _read_json(file)
        if not isinstance(data, dict):
            continue
        rows = [[k, _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)[:160]] for k, v in data.items()]
        doc.para(file.name)
        doc.table(["key", "value"], rows[:30])


def _faults_section(doc: _Doc, rows: list[dict]) -> None:
    """Steps whose update the step guard skipped and roll-backs, with the documents of each skipped batch."""
    faults = [r for r in rows if (r.get("event") == "train" and r.get("skipped")) or r.get("event") == "rollback"]
    if not faults:
        return
    doc.heading("Training faults")

    def docs(r: dict) -> str:
        listed = r.get("skipped_docs") or {}
        return "; ".join(f"{src}: {', '.join(map(str, ids[:8]))}{' …' if len(ids) > 8 else ''} ({len(ids)})"
                         for src, ids in sorted(listed.items()))

    doc.table(["step", "stage", "event", "reason", "loss", "documents (source: ids in its token cache)"],
              [[str(r.get("fault_step", r["step"])), str(r.get("stage")), "rollback" if r["event"] == "rollback"
                else "skipped", str(r.get("skipped")) if r["event"] == "train" else
                f"{r.get('reason')}, back to step {r.get('to_step')}", _fmt(r.get("loss")), docs(r)]
               for r in faults])




def _variants_section(doc: _Doc, run_dir: Path, stages: list[dict], evals: dict) -> None:
    """Per stage with `seeds` or `average`: its export's after-eval next to each seed branch's and the raw weights'
    (docs/AVERAGING.md), so souping and averaging show what they bought."""
    for st in stages:
        name, after = st["name"], evals[st["name"]][1]
        columns: dict[str, dict] = {}
        layout = RunLayout(run_dir)
        for seed in layout.branch_seeds(name):
            branch = layout.branch(name, seed)
            for file, label in ((branch.eval_after, branch.dir.name), (branch.eval_raw, f"{branch.dir.name} raw")):
                record = _read_json(file)
                if record:
                    columns[label] = record.get("metrics", {})
        raw = _read_json(layout.stage(name).eval_raw)
        if raw:
            columns["raw (not averaged)"] = raw.get("metrics", {})
        if not columns or not after:
            continue
        final = after.get("metrics", {})
        label = "soup" if layout.branch_seeds(name) else "averaged"
        doc.heading(f"Stage {name}: {label} vs its parts")
        keys = sorted({*final, *(k for m in columns.values() for k in m)})
        doc.table(["metric", label, *columns], [[k, _fmt(final.get(k)), *(_fmt(m.get(k)) for m in columns.values())]
                                                 for k in keys])

