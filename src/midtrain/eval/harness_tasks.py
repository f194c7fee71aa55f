"""midtrain's own lm-evaluation-harness tasks on local files: one task per lm-eval output type, built offline.

lm-eval reads tasks from YAML files (`--include_path DIR`); a task whose `dataset_path: json` names local
`data_files` needs no hub. `write_tasks(DIR)` writes these YAMLs and their jsonl data, deterministically, from data
the repo makes (the demo's arithmetic word problems) and data Python ships (pydoc topics):

  midtrain_arith_mc    multiple_choice (loglikelihood): a word problem and four candidate answers; acc, acc_norm
  midtrain_pydoc_ppl   loglikelihood_rolling: pydoc topic texts; word_perplexity, byte_perplexity, bits_per_byte
  midtrain_arith_gen   generate_until: the word problem, greedy answer, exact_match on its first integer (regex filter)

The YAMLs hold absolute data paths (lm-eval resolves `data_files` against the working directory), so the directory is
written where it is used: `builtin_tasks_dir()` under the midtrain cache, rewritten when `TASKS_VERSION` changes.
Run `python -m midtrain.eval.harness_tasks DIR` to write a copy to read or edit.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from midtrain.eval.tasks.arith import word_problem
from midtrain.io import write_text_atomic

TASKS_VERSION = 2
BUILTIN = ("midtrain_arith_mc", "midtrain_pydoc_ppl", "midtrain_arith_gen")
SIZES = {"midtrain_arith_mc": 200, "midtrain_pydoc_ppl": 40, "midtrain_arith_gen": 100}
SEED = 20260417

MC_YAML = """\
task: midtrain_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

PPL_YAML = """\
task: midtrain_pydoc_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: {version}
"""

GEN_YAML = """\
task: midtrain_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  do_sample: false
  max_gen_toks: 12
filter_list:
  - name: first-integer
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def _arith_mc(n: int) -> list[dict]:
    """Four choices: the answer and three near misses (off by one, by ten, a digit swap), in a seeded order."""
    rng = random.Random(SEED)
    out = []
    for _ in range(n):
        question, answer = word_problem(rng)
        wrong = {answer + 1, answer - 1, answer + 10, int(str(answer)[::-1]) if answer >= 10 else answer + 2}
        wrong.discard(answer)
        choices = [answer, *rng.sample(sorted(wrong), 3)]
        rng.shuffle(choices)
        out.append({"question": question, "choices": [str(c) for c in choices], "label": choices.index(answer)})
    return out


def _arith_gen(n: int) -> list[dict]:
    rng = random.Random(SEED + 1)
    return [{"question": q, "answer": str(a)} for q, a in (word_problem(rng) for _ in range(n))]


def _pydoc(n: int) -> list[dict]:
    """The first `n` pydoc topics (sorted by name), each cut to its first 1,500 characters at a line end."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics)[:n]:
        text = topics[name][:1500]
        out.append({"topic": name, "text": text[: text.rfind("\n")] if "\n" in text else text})
    return out


def write_tasks(directory: Path) -> Path:
    """The three task YAMLs and their data under `directory` (created); returns it."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    rows = {"midtrain_arith_mc": _arith_mc(SIZES["midtrain_arith_mc"]),
            "midtrain_pydoc_ppl": _pydoc(SIZES["midtrain_pydoc_ppl"]),
            "midtrain_arith_gen": _arith_gen(SIZES["midtrain_arith_gen"])}
    for (task, docs), template in zip(rows.items(), (MC_YAML, PPL_YAML, GEN_YAML)):
        data = directory / f"{task}.jsonl"
        write_text_atomic(data, "".join(json.dumps(d) + "\n" for d in docs))
        write_text_atomic(directory / f"{task}.yaml", template.format(data=data, version=TASKS_VERSION))
    return directory


def builtin_tasks_dir(cache_dir: Path) -> Path:
    """The built-in tasks under `cache_dir/harness_tasks/v<N>` (written once; the YAMLs point at this copy)."""
    directory = Path(cache_dir) / "harness_tasks" / f"v{TASKS_VERSION}"
    if not all((directory / f"{t}.yaml").is_file() for t in BUILTIN):
        write_tasks(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m midtrain.eval.harness_tasks DIR")
    print(write_tasks(Path(sys.argv[1])))
