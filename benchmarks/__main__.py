"""`python -m benchmarks`: run every registered benchmark, print its table, write `benchmarks/results/<name>.json`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from benchmarks import SUITES
from benchmarks.common import OUT_DIR, REGISTRY, RESULTS_DIR, format_table, machine_info, set_threads, write_result


def main(argv: list[str] | None = None) -> int:
    for module in SUITES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these benchmarks (repeatable or comma-separated): {', '.join(REGISTRY)}")
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer settings (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"where JSON goes (default {RESULTS_DIR})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, (_, help_text) in REGISTRY.items():
            print(f"{name:12s} {help_text}")
        return 0
    wanted = [n for item in args.only for n in item.split(",") if n] or list(REGISTRY)
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")

    OUT_DIR[0] = args.out_dir
    threads = set_threads(args.threads)
    info = machine_info()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    print(f"# {info['cpu']} ({info['logical_cpus']} CPUs; {flags})")
    print(f"# torch {info['torch']}, transformers {info['transformers']}, {threads} threads, "
          f"precision auto -> {info['auto_precision_cpu']}", flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for name in wanted:
        fn, _ = REGISTRY[name]
        start = time.perf_counter()
        result = fn(quick=args.quick, repeats=args.repeats, log=log)
        elapsed = time.perf_counter() - start
        result.extra["wall_s"] = round(elapsed, 1)
        print(f"\n## {name} ({elapsed:.0f} s)\n")
        print(format_table(result.columns, result.rows))
        if result.summary:
            cols = [c for c in result.summary[0] if c != "model" or len({s['model'] for s in result.summary}) > 1]
            print()
            print(format_table(cols, result.summary))
        for note in result.notes:
            print(f"- {note}")
        path = write_result(result, args.out_dir)
        print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
