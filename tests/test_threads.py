"""Threads chosen for the machine and its load (issue 24): explicit counts win, then OMP_NUM_THREADS, else each local
rank gets its share of the idle cores, never less than one."""

import pytest

from midtrain.config import Recipe
from midtrain.threads import choose_threads

from .train.tiny import midtrain, write_recipe


@pytest.mark.parametrize("cores, load, ranks, want", [
    (2, 0.1, 1, 2),    # an idle laptop: both cores
    (2, 1.7, 1, 1),    # another process busy on one core: one thread, not two fighting for it
    (2, 3.5, 1, 1),    # overloaded: still one
    (16, 0.0, 8, 2),   # torchrun with 8 local ranks: 2 threads each
    (16, 8.0, 2, 4),   # half the machine busy, 2 ranks share the rest
    (4, 0.0, 8, 1),    # more ranks than cores: one each
])
def test_auto_gives_each_rank_its_share_of_the_idle_cores(cores, load, ranks, want):
    assert choose_threads("auto", cores=cores, load=load, local_ranks=ranks, env={}).threads == want


def test_explicit_counts_and_omp_num_threads_win():
    assert choose_threads(3, cores=2, load=5.0, env={}).threads == 3
    assert choose_threads("auto", cores=8, load=0.0, env={"OMP_NUM_THREADS": "1"}).why == "OMP_NUM_THREADS"
    assert choose_threads(None, cores=8, load=0.0, env={"LOCAL_WORLD_SIZE": "4"}).threads == 2
    with pytest.raises(ValueError, match="threads: 0: must be a positive"):
        choose_threads(0)


def test_the_recipe_field_accepts_auto_or_a_positive_count():
    base = {"base": "preset:tiny-llama", "tokenizer": "bytes", "sources": [{"name": "a", "path": "a.jsonl"}],
            "stages": [{"name": "s", "tokens": 512, "seq_len": 64, "batch": {"tokens": 512},
                        "schedule": {"kind": "constant", "peak_lr": 1e-3}, "data": {"mixture": {"a": 1}}}]}
    assert Recipe.model_validate({**base, "threads": "auto"}).threads == "auto"
    assert Recipe.model_validate({**base, "threads": 2}).threads == 2
    with pytest.raises(ValueError):
        Recipe.model_validate({**base, "threads": 0})


def test_run_says_which_threads_it_chose_and_refuses_a_bad_value(tmp_path):
    recipe = write_recipe(tmp_path, warm_tokens=512, anneal_tokens=512)
    bad = midtrain("run", str(recipe), "--threads", "many", cache=tmp_path / "c", check=False)
    assert bad.returncode == 2 and "--threads 'many'" in bad.stderr and "Traceback" not in bad.stderr
    ok = midtrain("run", str(recipe), "--set", f"run_dir={tmp_path / 'run'}", "--threads", "1", cache=tmp_path / "c")
    assert "threads: 1 (as asked)" in ok.stdout
