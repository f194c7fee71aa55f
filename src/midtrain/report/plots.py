"""The report's figures, one function per PNG, drawn from a run dir's files (matplotlib, headless Agg).

Every plot marks stage boundaries in tokens, because a mid-training run is read stage by stage.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from midtrain.eval.keys import MetricKey  # noqa: E402
from midtrain.io import write_bytes_atomic  # noqa: E402

Rows = Sequence[dict]


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def _boundaries(ax, stages: Sequence[dict]) -> None:
    top = ax.get_ylim()[1]
    for st in stages:
        ax.axvline(st["first_tokens"], color="grey", linestyle="--", linewidth=0.8)
        ax.text(st["first_tokens"], top, f" {st['name']}", va="top", ha="left", fontsize=8, color="dimgrey")


VAL = "val_"  # held-out rows of metrics.jsonl prefix the eval's metric keys (val_loss.math)
SCORE_TASKS = ("passkey", "niah", "ruler", "arith")  # accuracy-type tasks (plus harness metrics)


def _loss_domain(field: str) -> str | None:
    """The domain of a per-domain loss field of a train or held-out row (`loss.math`, `val_loss.math`), else None."""
    key = MetricKey.try_parse(field.removeprefix(VAL))
    return key.domain if key is not None and key.task == "loss" and key.length is None else None


def loss_curves(rows: Rows, stages: Sequence[dict], path: Path) -> Path | None:
    """Train loss per domain (lines) and held-out loss per domain (markers) over global tokens."""
    train = [r for r in rows if r.get("event") == "train"]
    val = [r for r in rows if r.get("event") == "val"]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if train:
        _raw_and_smoothed(ax, train, "loss", "black", "train", stages)
    domains = sorted({d for r in train + val for d in map(_loss_domain, r) if d is not None})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, domain in enumerate(domains):
        color = colors[i % len(colors)]
        key = str(MetricKey("loss", domain=domain))
        if any(key in r for r in train):
            _raw_and_smoothed(ax, [r for r in train if key in r], key, color, f"train {domain}", stages)
        pts = [(r["tokens"], r[VAL + key]) for r in val if VAL + key in r]
        if pts:
            ax.plot(*zip(*pts), color=color, marker="o", linestyle=":", label=f"held-out {domain}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title("Loss per domain")
    _boundaries(ax, stages)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, started at the first value (no bias toward 0)."""
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * v + (1 - alpha) * current
        out.append(current)
    return out


def _raw_and_smoothed(ax, rows: Rows, key: str, color, label: str, stages: Sequence[dict]) -> None:
    """The raw series faint and an EMA spanning ~1/20 of the points bold, each stage drawn apart (no line across the
    gap between stages or a resume)."""
    starts = sorted(st["first_tokens"] for st in stages) or [0]
    alpha = 2 / (max(5, len(rows) / 20) + 1)  # an EMA spanning 1/20 of the points, at least 5
    for i, lo in enumerate(starts):
        hi = starts[i + 1] if i + 1 < len(starts) else float("inf")
        part = [r for r in rows if lo < r["tokens"] <= hi or (i == 0 and r["tokens"] <= lo)]
        if not part:
            continue
        xs, ys = [r["tokens"] for r in part], [r[key] for r in part]
        ax.plot(xs, ys, color=color, linewidth=0.6, alpha=0.25)
        ax.plot(xs, _smooth(ys, alpha), color=color, linewidth=1.3, label=label)
        label = None  # once per series, on its first stage


def lr_and_mixture(rows: Rows, stages: Sequence[dict], path: Path) -> Path | None:
    """LR of every step (top) and each stage's mixture shares over its token range (bottom)."""
    train = [r for r in rows if r.get("event") == "train" and "lr" in r]
    if not train and not stages:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if train:
        top.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:blue")
    top.set_ylabel("learning rate")
    top.set_title("Learning rate and data mixture")
    _boundaries(top, stages)
    sources = sorted({s for st in stages for s in st.get("mixture", {})})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled: set[str] = set()
    for st in stages:
        bottom_at = 0.0
        for i, src in enumerate(sources):
            share = st.get("mixture", {}).get(src, 0.0)
            if share:  # a stacked bar spanning the stage's tokens: shares are constant within a stage
                bottom.bar(st["first_tokens"], share, width=st["tokens"], bottom=bottom_at, align="edge",
                           color=colors[i % len(colors)], label=None if src in labelled else src)
                labelled.add(src)
                bottom_at += share
    bottom.set_ylim(0, 1)
    bottom.set_yticks([0, 0.5, 1], ["0", "50%", "100%"])
    bottom.set_ylabel("mixture share")
    bottom.set_xlabel("tokens")
    handles, labels = bottom.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:  # beside the plot, not over the bars
        bottom.legend(unique.values(), unique.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                      frameon=False)
    return _save(fig, path)


def throughput(rows: Rows, stages: Sequence[dict], path: Path) -> Path | None:
    """Tokens/s of every step (top) and MFU where the run logged it (bottom), over global tokens."""
    train = [r for r in rows if r.get("event") == "train" and "tokens_per_s" in r]
    if not train:
        return None
    mfu = [(r["tokens"], r["mfu"]) for r in train if "mfu" in r]
    fig, axes = plt.subplots(2 if mfu else 1, 1, figsize=(8, 4.8 if mfu else 3), sharex=True, squeeze=False)
    top = axes[0][0]
    top.plot([r["tokens"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green", linewidth=0.9)
    top.set_ylabel("tokens/s")
    top.set_title("Throughput" + (" and model FLOPs utilisation" if mfu else ""))
    _boundaries(top, stages)
    if mfu:
        bottom = axes[1][0]
        bottom.plot(*zip(*mfu), color="tab:purple", linewidth=0.9)
        bottom.set_ylabel("MFU")
        bottom.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        bottom.set_ylim(bottom=0)
        for st in stages:
            bottom.axvline(st["first_tokens"], color="grey", linestyle="--", linewidth=0.8)
    axes[-1][0].set_xlabel("tokens")
    return _save(fig, path)


def _length_series(evals: dict[str, dict], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """{label: [(length, value)]} for metrics `<prefix>@<L>` of each eval (label = stage / 'start')."""
    out = {}
    for label, ev in evals.items():
        keys = {k: MetricKey.try_parse(k) for k in ev["metrics"]}
        pts = sorted((key.length, ev["metrics"][k]) for k, key in keys.items()
                     if key is not None and key.task == prefix and key.length is not None and key.domain is None)
        if pts:
            out[label] = pts
    return out


def per_length(evals: dict[str, dict], prefix: str, ylabel: str, title: str, path: Path,
               log_y: bool = False) -> Path | None:
    """One line per evaluated checkpoint: `<prefix>@L` against L (perplexity vs length, passkey per length)."""
    series = _length_series(evals, prefix)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in series.items():
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    elif prefix in SCORE_TASKS:  # accuracies: one fixed scale, so plots of different runs compare at a glance
        ax.set_ylim(0, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def niah_heatmap(grid: dict[str, dict[str, float]], title: str, path: Path) -> Path | None:
    """Accuracy by (depth, length): rows are depths (0 = start of the haystack), columns lengths."""
    if not grid:
        return None
    lengths = sorted(grid, key=int)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    values = [[grid[L].get(d, float("nan")) for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 0.8 + 0.45 * len(depths)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def task_bars(stages: Sequence[tuple[str, dict, dict]], path: Path) -> Path | None:
    """Accuracy-type metrics (passkey, niah, ruler, arith, harness) before vs after, one group per stage."""
    keys = sorted({k for _, b, a in stages for k in {**b, **a} if _is_score(k)})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(keys) * len(stages) + 2), 4))
    width = 0.8 / (2 * len(stages))
    for s, (name, before, after) in enumerate(stages):
        for w, (label, values) in enumerate((("before", before), ("after", after))):
            offset = (2 * s + w) * width - 0.4 + width / 2
            ax.bar([i + offset for i in range(len(keys))], [values.get(k, 0.0) for k in keys], width,
                   label=f"{name} {label}", alpha=0.55 if label == "before" else 1.0)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy / recall")
    ax.set_title("Task scores before and after each stage")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _is_score(metric: str) -> bool:
    key = MetricKey.try_parse(metric)
    return key is not None and (key.task in SCORE_TASKS or key.family == "harness")


def gradient_noise_scale(series: dict[str, Rows], stages: Sequence[dict], path: Path) -> Path | None:
    """B_simple = tr(Σ)/|G|² (tokens) over tokens, log scale; one line per run or seed branch (docs/MONITORING.md)."""
    lines = {label: [(r["tokens"], r["gns"]) for r in rows if r.get("event") == "train" and "gns" in r
                     and isinstance(r["gns"], (int, float)) and r["gns"] > 0]
             for label, rows in series.items()}
    lines = {label: pts for label, pts in lines.items() if pts}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, pts in lines.items():
        ax.plot(*zip(*pts), marker=".", linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("B_simple (tokens)")
    ax.set_title("Gradient noise scale (critical batch ≈ B_simple)")
    _boundaries(ax, stages)
    ax.legend(fontsize=8)
    return _save(fig, path)
