from __future__ import annotations

import gzip
import json

import pytest

from midtrain.data import DataError, SkipReport, iter_documents, list_files


def test_bad_jsonl_lines_are_counted_with_file_and_line(tmp_path):
    f = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),  # 1
        b"{not json",  # 2
        b'{"text": "caf\xe9"}',  # 3: latin-1 byte, not UTF-8
        json.dumps({"body": "no text field"}).encode(),  # 4
        json.dumps({"text": 42}).encode(),  # 5
        json.dumps({"text": "   "}).encode(),  # 6
        b"",  # 7: blank line, not a record
        json.dumps(["a", "list"]).encode(),  # 8
        json.dumps({"text": "good two \u00e9\U0001f600"}).encode(),  # 9
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    skips = SkipReport()
    docs = list(iter_documents(f, skips=skips))
    assert [d.text for d in docs] == ["good one", "good two \u00e9\U0001f600"]
    assert [d.location for d in docs] == [f"{f}:1", f"{f}:9"]
    assert skips.counts == {"invalid_json": 1, "non_utf8": 1, "missing_field": 1, "not_string": 1, "empty": 1,
                            "not_object": 1}
    assert skips.total == 6
    assert skips.examples[:2] == [f"{f}:2: invalid_json", f"{f}:3: non_utf8"]
    assert len(skips.examples) == 5  # only the first few are kept
    assert SkipReport.from_dict(json.loads(json.dumps(skips.to_dict()))).counts == skips.counts


def test_custom_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"content": "x", "text": "y"}) + "\n")
    assert [d.text for d in iter_documents(f, text_field="content")] == ["x"]


def test_directory_is_recursive_sorted_and_mixes_formats(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.jsonl").write_text(json.dumps({"text": "b/z"}) + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz1"}) + "\n" + json.dumps({"text": "gz2"}) + "\n")
    (tmp_path / "c.txt").write_text("a whole\n\nfile is one document\n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.jsonl").write_text(json.dumps({"text": "ignored"}) + "\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.jsonl").write_text(json.dumps({"text": "ignored"}) + "\n")
    docs = list(iter_documents(tmp_path))
    assert [d.text for d in docs] == ["gz1", "gz2", "b/z", "a whole\n\nfile is one document\n"]
    assert docs[1].location == f"{tmp_path / 'a.jsonl.gz'}:2"
    assert docs[3].location == f"{tmp_path / 'c.txt'}:1"
    assert [p.name for p in list_files(tmp_path)] == ["a.jsonl.gz", "z.jsonl", "c.txt"]


def test_missing_path_and_empty_directory_are_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        iter_documents(missing)  # eager: fails at call time, not at first next()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no .jsonl"):
        iter_documents(tmp_path / "empty")
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        iter_documents(bad)


def test_corrupt_gzip_names_file_and_line(tmp_path):
    f = tmp_path / "broken.jsonl.gz"
    data = gzip.compress(("\n".join(json.dumps({"text": f"doc {i} " * 50}) for i in range(200)) + "\n").encode())
    f.write_bytes(data[: len(data) // 2])  # truncated download
    it = iter_documents(f)
    with pytest.raises(DataError, match=rf"{f}:\d+: cannot read file"):
        list(it)


def test_non_utf8_and_empty_txt_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe bad")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("ok")
    skips = SkipReport()
    assert [d.text for d in iter_documents(tmp_path, skips=skips)] == ["ok"]
    assert skips.counts == {"non_utf8": 1, "empty": 1}


# --------------------------------------------------------------------------- parquet, HF datasets, fsspec


def test_parquet_rows_metadata_and_bad_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["first", None, "  ", "fourth"], "lang": ["en", "de", "fr", "it"]}), f,
                   row_group_size=2)
    skips = SkipReport()
    docs = list(iter_documents(f, skips=skips, keep_record=True))
    assert [(d.text, d.location, d.record["lang"]) for d in docs] == [("first", f"{f}:row 1", "en"),
                                                                     ("fourth", f"{f}:row 4", "it")]
    assert skips.counts == {"not_string": 1, "empty": 1}
    assert skips.examples[0] == f"{f}:row 2: not_string"


def test_parquet_missing_column_and_corrupt_file_are_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(DataError, match=rf"{f}: no column 'text' \(columns: body\)"):
        list(iter_documents(f))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(f.read_bytes()[:20])
    with pytest.raises(DataError, match=rf"{bad}:row 1: cannot read parquet"):
        list(iter_documents(bad))


def test_saved_hf_dataset_dirs(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", ""], "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    skips = SkipReport()
    docs = list(iter_documents(tmp_path / "ds", skips=skips))
    assert [d.text for d in docs] == ["a", "b"] and docs[1].location == f"{tmp_path / 'ds'}:row 2"
    assert skips.counts == {"empty": 1}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["t1"]}),
                               "test": datasets.Dataset.from_dict({"content": ["e1"]})})
    dd.save_to_disk(tmp_path / "mixed" / "dd")
    (tmp_path / "mixed" / "extra.jsonl").write_text(json.dumps({"content": "j"}) + "\n")
    # a dataset dir inside a source directory is one unit; its arrow/json files are not read as data
    assert [d.text for d in iter_documents(tmp_path / "mixed", text_field="content")] == ["t1", "j"]
    assert all(p.is_file() for p in list_files(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"\[train\]: no column 'text'"):
        list(iter_documents(tmp_path / "mixed"))


def test_remote_paths_through_fsspec_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", b'{"text": "remote one"}\n{bad\n')
    fs.pipe("/corpus/sub/b.jsonl.gz", gzip.compress(b'{"text": "remote two"}\n'))
    fs.pipe("/corpus/notes.md", b"ignored")
    skips = SkipReport()
    docs = list(iter_documents("memory://corpus", skips=skips))
    assert [d.text for d in docs] == ["remote one", "remote two"]
    assert docs[0].location == "memory:///corpus/a.jsonl:1"
    assert skips.examples == ["memory:///corpus/a.jsonl:2: invalid_json"]
    with pytest.raises(DataError, match="does not exist"):
        iter_documents("memory://nowhere")


def test_recipe_source_may_be_an_fsspec_url_and_trains(tmp_path, monkeypatch):
    """`path: memory://…` (any fsspec URL) survives recipe loading unresolved and is read when tokenizing."""
    import fsspec

    from midtrain.config import load_recipe
    from midtrain.run import RunOptions, run

    fs = fsspec.filesystem("memory")
    fs.pipe("/recipe-url/web.jsonl", "".join(f'{{"text": "document number {i} of the remote corpus."}}\n'
                                             for i in range(60)).encode())
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "base: preset:tiny-llama\ntokenizer: bytes\nprecision: fp32\n"
        "sources: [{name: web, path: 'memory://recipe-url/web.jsonl', holdout_docs: 4}]\n"
        "stages: [{name: s, init: scratch, tokens: 512, seq_len: 64, batch: {tokens: 256},"
        " schedule: {kind: constant, peak_lr: 1e-3}, data: {mixture: {web: 1}}}]\n")
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(recipe_file, [f"run_dir={tmp_path / 'run'}"])
    assert recipe.sources[0].path == "memory://recipe-url/web.jsonl"
    run(recipe, RunOptions(progress=False))
    assert (tmp_path / "run" / "stages" / "s" / "hf" / "config.json").is_file()
    fs.rm("/recipe-url/web.jsonl")
    with pytest.raises(Exception, match="memory://recipe-url/web.jsonl"):  # gone: the error names the URL
        run(load_recipe(recipe_file, [f"run_dir={tmp_path / 'run2'}"]), RunOptions(progress=False))
