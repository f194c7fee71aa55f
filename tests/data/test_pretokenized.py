"""Pre-tokenized sources read in place: shards written by the producing libraries themselves (datatrove's
DocumentTokenizer and MegatronDocumentTokenizer through a LocalPipelineExecutor, numpy for dolma-style files,
`datasets` for input_ids) are seen document for document, a run over one trains with the planned shares and
resumes exactly, and a tokenizer mismatch is a one-line error naming the file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midtrain.config.recipe import Source
from midtrain.data import DataError, PackedLoader, byte_tokenizer
from midtrain.data.pretokenized import TokenView, detect_format, open_pretokenized, pretokenized_problems

from .corpus import random_texts, write_jsonl

TEXTS = random_texts(240, seed=11, lo=3, hi=60)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _reference(tok, texts) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]


def _datatrove(out: Path, inputs: Path, tok_file: Path, *, megatron: bool = False, eos: str = "<|eos|>",
               loss: bool = False) -> Path:
    """Tokenize `inputs/*.jsonl` with datatrove itself: 2 tasks (one shard per input file), one worker, offline."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer, MegatronDocumentTokenizer

    writer = (MegatronDocumentTokenizer(str(out), tokenizer_name_or_path=str(tok_file), eos_token=eos) if megatron
              else DocumentTokenizer(str(out), str(tok_file), eos_token=eos, save_loss_metadata=loss, seed=0))
    LocalPipelineExecutor(pipeline=[JsonlReader(str(inputs)), writer], tasks=2, workers=1,
                          logging_dir=str(out.parent / f"logs-{out.name}")).run()
    return out


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tok) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretok")
    tok.save_pretrained(root / "tok")
    tok_file = root / "tok" / "tokenizer.json"
    half = len(TEXTS) // 2
    write_jsonl(root / "in" / "a.jsonl", TEXTS[:half])
    write_jsonl(root / "in" / "b.jsonl", TEXTS[half:])
    out = {"tok_file": tok_file, "root": root}
    out["datatrove"] = _datatrove(root / "ds", root / "in", tok_file)
    out["megatron"] = _datatrove(root / "mg", root / "in", tok_file, megatron=True)
    ref = _reference(tok, TEXTS)
    (root / "npy").mkdir()
    # dolma writes raw memmaps (no header) named .npy; a real .npy (with its header) works too
    np.concatenate([np.array(d, np.uint16) for d in ref[:half]]).tofile(root / "npy" / "part-0.npy")
    np.save(root / "npy" / "part-1.npy", np.concatenate([np.array(d, np.uint16) for d in ref[half:]]))
    out["numpy"] = root / "npy"
    import datasets

    datasets.Dataset.from_dict({"input_ids": ref, "n": list(range(len(ref)))}).save_to_disk(
        str(root / "hf"), num_shards=2)
    out["hf_dataset"] = root / "hf"
    # instruction-like documents with a no-loss prompt (datatrove's no_loss_ranges metadata -> .ds.loss)
    (root / "qa").mkdir()
    for k in range(2):
        with open(root / "qa" / f"{k}.jsonl", "w") as f:
            for i in range(20):
                prompt = f"Q{k}.{i}: what is {i} + {i}? "
                f.write(json.dumps({"text": prompt + f"A: {2 * i}.", "no_loss_ranges": [[0, len(prompt)]]}) + "\n")
    out["loss"] = _datatrove(root / "ds-loss", root / "qa", tok_file, loss=True)
    out["bad_eos"] = _datatrove(root / "ds-pad", root / "in", tok_file, eos="<|pad|>")
    return out


def _all_docs(src) -> list[list[int]]:
    return [src.doc(i).tolist() for i in range(src.n_docs)] + [d.tolist() for d in src.holdout_docs()]


@pytest.mark.parametrize("fmt", ["datatrove", "megatron", "numpy", "hf_dataset"])
def test_source_sees_exactly_the_documents_the_producer_wrote(corpora, tok, tmp_path, fmt):
    config = Source(name="pre", path=corpora[fmt], holdout_docs=7)
    assert detect_format(config) == fmt
    assert pretokenized_problems(config, tok) == []
    src = open_pretokenized(config, tok, cache_dir=tmp_path / "cache")
    assert sorted(_all_docs(src)) == sorted(_reference(tok, TEXTS))  # every document once, train or held out
    assert src.n_docs == len(TEXTS) - 7 and len(src.holdout_docs()) == 7
    assert isinstance(src.tokens, TokenView) and src.tokens.spans > 1  # two shards + held-out gaps, in place
    # the cache holds metadata only; a second open picks the same held-out documents
    assert {p.suffix for p in src.directory.iterdir()} <= {".json", ".npy"}
    assert sum(p.stat().st_size for p in src.directory.iterdir()) < 64 * 1024
    again = open_pretokenized(config, tok, cache_dir=tmp_path / "other")
    assert again.meta["holdout"]["documents"] == src.meta["holdout"]["documents"]
    assert [d.tolist() for d in again.holdout_docs()] == [d.tolist() for d in src.holdout_docs()]
    # the loader keeps the view (no np.asarray over the corpus) and reads documents through it
    loader = PackedLoader([src], [1.0], seq_len=64, global_batch_seqs=4, seed=0)
    assert loader._tokens[0] is src.tokens
    batch = loader.next_step()[0]
    assert int(batch["input_ids"].max()) < len(tok)


@pytest.mark.parametrize("fmt", ["datatrove", "megatron", "numpy", "hf_dataset"])
def test_loader_reads_every_training_document_once_per_epoch_and_resumes_exactly(corpora, tok, tmp_path, fmt):
    src = open_pretokenized(Source(name="pre", path=corpora[fmt], holdout_docs=7), tok, cache_dir=tmp_path)
    rows, seq = 4, 64
    loader = PackedLoader([src], [1.0], seq_len=seq, global_batch_seqs=rows, seed=3)
    steps = -(-src.n_tokens // (rows * seq))
    stream = np.concatenate([mb["input_ids"].numpy().ravel() for _ in range(steps) for mb in loader.next_step()])
    ends = np.flatnonzero(stream[: src.n_tokens] == tok.eos_token_id) + 1  # every document ends with its EOS
    epoch = [d.tolist() for d in np.split(stream[: src.n_tokens], ends[:-1])]
    held = {tuple(d.tolist()) for d in src.holdout_docs()}
    assert sorted(epoch) == sorted(d for d in _reference(tok, TEXTS) if tuple(d) not in held)

    kwargs = dict(seq_len=seq, global_batch_seqs=rows, seed=3, length_buckets=[[(0, 30, 0.5), (30, None, 0.5)]])
    reference = PackedLoader([src], [1.0], **kwargs)
    straight = [mb for _ in range(12) for mb in reference.next_step()]
    first = PackedLoader([src], [1.0], **kwargs)
    head = [mb for _ in range(5) for mb in first.next_step()]
    resumed = PackedLoader([src], [1.0], **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [mb for _ in range(7) for mb in resumed.next_step()]
    for x, y in zip(head + tail, straight, strict=True):
        assert all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)


def test_glob_path_reads_the_matching_shards_in_name_order(corpora, tok, tmp_path):
    config = Source(name="pre", path=f"{corpora['datatrove']}/*.ds", holdout_docs=0)
    src = open_pretokenized(config, tok, cache_dir=tmp_path)
    assert [s["name"] for s in src.meta["shards"]] == sorted(s["name"] for s in src.meta["shards"])
    assert len(src.meta["shards"]) == 2 and src.n_docs == len(TEXTS)


def test_token_view_slices_within_and_across_spans():
    a, b = np.arange(10, dtype=np.uint16), np.arange(100, 110, dtype=np.uint16)
    view = TokenView([a, b], np.array([1, 0]), np.array([2, 0]), np.array([5, 4]))  # b[2:7] then a[0:4]
    assert len(view) == 9 and view[0:5].tolist() == [102, 103, 104, 105, 106] and view[5:9].tolist() == [0, 1, 2, 3]
    assert np.shares_memory(view[1:4], b)
    assert view[3:7].tolist() == [105, 106, 0, 1] and view[-1] == 3 and np.asarray(view).tolist()[-2:] == [2, 3]


def test_loss_mask_from_ds_loss_is_honoured(corpora, tok, tmp_path):
    src = open_pretokenized(Source(name="qa", path=corpora["loss"], holdout_docs=2), tok, cache_dir=tmp_path)
    assert src.mask is not None and src.meta["has_mask"]
    for i in range(src.n_docs):
        ids, mask = src.doc(i), src.mask[src.offsets[i] : src.offsets[i + 1]]
        prompt = bytes(ids.tolist()[: ids.tolist().index(ord("A"))]).decode()  # byte tokenizer: id == byte
        assert prompt.startswith("Q") and prompt.endswith("? ")
        assert mask.tolist() == [0] * len(prompt) + [1] * (len(ids) - len(prompt))  # the answer and EOS train
    assert all(m is not None and m[0] == 0 for m in src.holdout_masks())
    loader = PackedLoader([src], [1.0], seq_len=64, global_batch_seqs=2, seed=0)
    mb = loader.next_step()[0]
    ids, labels = mb["input_ids"].ravel().numpy(), mb["labels"].ravel().numpy()
    trained = ids[labels != -100]
    assert trained.size and ord("Q") not in trained.tolist()  # no prompt token carries loss


def test_tokenizer_mismatch_is_a_one_line_error_naming_the_file(corpora, tok, tmp_path):
    bad = tmp_path / "big"
    bad.mkdir()
    np.array([65, 66, 257, 300, 67, 257], dtype=np.uint16).tofile(bad / "part-0.npy")
    config = Source(name="big", path=bad, holdout_docs=0)
    [problem] = pretokenized_problems(config, tok)
    assert str(bad / "part-0.npy") in problem and "token id 300" in problem
    with pytest.raises(DataError) as e:
        open_pretokenized(config, tok, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and "part-0.npy" in str(e.value)

    pad = Source(name="pad", path=corpora["bad_eos"], holdout_docs=0)  # written with <|pad|> as the EOS
    problems = pretokenized_problems(pad, tok)
    assert len(problems) == 2 and all(".ds: documents end with token id 258" in p and "is 257" in p
                                      for p in problems)
    with pytest.raises(DataError, match=r"00000_00000_doc_shuffled\.ds: documents end with token id 258"):
        open_pretokenized(pad, tok, cache_dir=tmp_path / "cache")
    assert pretokenized_problems(pad.model_copy(update={"eos_token_id": 258}), tok) == []

    class Wide:  # a 70k-token vocabulary: datatrove's uint16 shards cannot hold it
        eos_token_id = 257

        def __len__(self):
            return 70_000

    problems = pretokenized_problems(Source(name="d", path=corpora["datatrove"]), Wide())
    assert len(problems) == 2 and all("uint16 tokens cannot hold the tokenizer's 70,000 ids" in p for p in problems)
    assert pretokenized_problems(Source(name="t", path=corpora["root"] / "in"), tok) == []  # text: nothing


RECIPE = """\
base: preset:tiny-llama
tokenizer: bytes
seed: 5
precision: fp32
sources:
  - {{name: prose, path: prose.jsonl, holdout_docs: 4}}
  - {{name: pre, path: {pre}, holdout_docs: 4}}
checkpoint: {{every_tokens: 1024, keep_last: 2}}
stages:
  - name: warm
    init: scratch
    tokens: 1024
    seq_len: 64
    batch: {{tokens: 512}}
    schedule: {{kind: constant, peak_lr: 3e-3, warmup_tokens: 512}}
    data: {{mixture: {{prose: 0.5, pre: 0.5}}}}
    eval: {{max_docs: 2}}
  - name: anneal
    init: weights+optimizer
    start_lr: from_previous
    tokens: 3072
    seq_len: 64
    batch: {{tokens: 512}}
    schedule: {{kind: wsd, decay_fraction: 1.0, decay_shape: linear, min_lr: 0}}
    data: {{mixture: {{prose: 0.3, pre: 0.7}}}}
    eval: {{max_docs: 2}}
"""


def _midtrain(*args, cache: Path, fault: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIDTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    env.pop("MIDTRAIN_FAULT", None)
    if fault:
        env["MIDTRAIN_FAULT"] = fault
    out = subprocess.run([sys.executable, "-m", "midtrain", *args], capture_output=True, text=True, timeout=300,
                         env=env)
    if check and out.returncode:
        raise AssertionError(f"midtrain {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"]


def _stage_shares(run_dir: Path, stage: str) -> dict[str, float]:
    last = max((run_dir / "checkpoints" / stage).glob("step-*/trainer.json"),
               key=lambda p: int(p.parent.name.removeprefix("step-")))
    loader = json.loads(last.read_text())["loader"]
    tokens = loader["sampler"]["tokens"]
    return {name: t / sum(tokens) for name, t in zip(loader["sources"], tokens)}


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 7))).strip() or "a" for _ in range(n)]


def _run_here(recipe: Path, run_dir: Path, cache: Path, monkeypatch) -> None:
    """`midtrain run` in this process (imports paid once), on 2 threads like the child processes."""
    import torch

    from midtrain.config import load_recipe
    from midtrain.run import RunOptions, run

    monkeypatch.setenv("MIDTRAIN_CACHE", str(cache))
    threads = torch.get_num_threads()
    try:
        run(load_recipe(recipe, [f"run_dir={run_dir}"]), RunOptions(progress=False, threads=2))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_run_over_a_pretokenized_source_keeps_shares_and_resumes_exactly(corpora, tmp_path, monkeypatch):
    texts = _words(600, seed=3)  # documents of 2..8 tokens: shares settle within a few steps
    write_jsonl(tmp_path / "in" / "a.jsonl", texts[:300])
    write_jsonl(tmp_path / "in" / "b.jsonl", texts[300:])
    pre = _datatrove(tmp_path / "pre", tmp_path / "in", corpora["tok_file"])
    write_jsonl(tmp_path / "prose.jsonl", _words(600, seed=4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(pre=pre))
    cache = tmp_path / "cache"

    ref_dir = tmp_path / "ref"
    _run_here(recipe, ref_dir, cache, monkeypatch)
    expected = _train_rows(ref_dir)
    assert len(expected) == 2 + 6
    # realized shares per stage (the loader's token counts in the stage's last checkpoint); documents of <= 9
    # tokens against 1,024 (warm) and 3,072 (anneal) tokens: the anneal stage is within 0.5 points
    for stage, plan, tol in (("warm", {"prose": 0.5, "pre": 0.5}, 0.01), ("anneal", {"prose": 0.3, "pre": 0.7}, 0.005)):
        got = _stage_shares(ref_dir, stage)
        assert all(abs(got[n] - plan[n]) < tol for n in plan), (stage, got, plan)
    report = json.loads((ref_dir / "data" / "tokenize.json").read_text())
    assert report["pre"]["n_docs"] == 600 - 4 and report["pre"]["path"] == str(pre)
    assert len(list((cache / "tok").glob("*/tokens.bin"))) == 1  # only the text source was tokenized into the cache
    assert len(list((cache / "pretok").glob("*/meta.json"))) == 1

    run_dir = tmp_path / "run"  # SIGKILLed in the anneal stage's 3rd step (after its step-2 checkpoint), resumed
    killed = _midtrain("run", str(recipe), "--set", f"run_dir={run_dir}", cache=cache,
                       fault="train.mid_step:5:kill", check=False)
    assert killed.returncode != 0 and len(_train_rows(run_dir)) == 4
    _run_here(recipe, run_dir, cache, monkeypatch)
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resume") == 1
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]  # bit for bit
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in expected]


def test_recipe_check_reads_globs_and_names_a_token_file_that_does_not_fit(corpora, tmp_path):
    from midtrain.config import RecipeError, load_recipe
    from midtrain.plan import build_plan
    from midtrain.run import preflight

    write_jsonl(tmp_path / "prose.jsonl", _words(50, seed=1))
    bad = tmp_path / "wide"
    bad.mkdir()
    np.array([65, 66, 257, 300, 67, 257] * 800, dtype=np.uint16).tofile(bad / "part-0.npy")
    shards = corpora["datatrove"] / "*.ds"
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(pre=shards).replace("checkpoint:", f"  - {{name: wide, path: {bad}}}\ncheckpoint:")
    recipe.write_text(text.replace("pre: 0.5}", "pre: 0.4, wide: 0.1}"))
    loaded = load_recipe(recipe)
    assert str(loaded.sources[1].path).endswith("*.ds")
    [problem] = preflight(loaded, build_plan(loaded)).problems
    assert problem.field == "sources.wide.path" and "part-0.npy: token id 300" in problem.message

    recipe.write_text(RECIPE.format(pre=tmp_path / "nothing-*.ds"))
    with pytest.raises(RecipeError, match=r"sources\.pre\.path: .*nothing-\*\.ds matches no files"):
        load_recipe(recipe)
