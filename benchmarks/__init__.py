"""midtrain's benchmark suite: `python -m benchmarks [--only NAME] [--quick]`.

Each module registers its benchmarks with `benchmarks.common.register`; `SUITES` lists the modules `__main__`
imports. A new benchmark is a new module here plus one entry in `SUITES`. Results go to `benchmarks/results/`.
"""

SUITES = (
    "benchmarks.trainer",
    "benchmarks.packing",
    "benchmarks.memory",
    "benchmarks.compile",
    "benchmarks.data",
    "benchmarks.tokenize_shards",
    "benchmarks.loss",
    "benchmarks.integrity",
    "benchmarks.threads",
    "benchmarks.families",
    "benchmarks.scale",
    "benchmarks.harness",
)
