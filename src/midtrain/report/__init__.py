"""Run report: markdown + HTML with matplotlib plots (`midtrain report RUN_DIR`, also written by `midtrain run`)."""

from __future__ import annotations


def write_report(run_dir):
    """Writes RUN/report.md, RUN/report.html and RUN/plots/*.png; returns the HTML path (imports matplotlib lazily)."""
    from midtrain.report.build import write_report as build

    return build(run_dir)


__all__ = ["write_report"]
