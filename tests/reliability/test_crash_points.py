"""Kill `midtrain run` at each fault-injection point, resume, and compare with one uninterrupted run.

One reference run per module; every scenario launches real subprocesses (tests/reliability/harness.py) and dies by
SIGKILL (or an injected ENOSPC / RLIMIT_FSIZE), so nothing in-process can paper over a bad on-disk state.
"""

from __future__ import annotations

import pytest

from . import harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> harness.Reference:
    reference = harness.make_reference(tmp_path_factory.mktemp("reliability"))
    assert len(reference.rows) == harness.STEPS
    return reference


def _resumed_exactly(obs: dict) -> None:
    assert obs["resume_rc"] == 0, obs["stderr"]
    assert obs["steps_equal"] and obs["losses_equal"] and obs["lr_gradnorm_equal"], obs
    assert obs["max_abs_diff"] == 0.0


def test_kill_mid_step_then_corrupt_newest_checkpoint(ref, tmp_path):
    """Killed in step 7 (after backward, before the update): checkpoints 4 and 6 exist. Flip one bit of step 6:
    a plain resume refuses, naming the file and the flag; --fallback-checkpoint resumes from 4, exactly."""
    obs = harness.corrupt_newest(ref, tmp_path, kill_step=7)
    assert obs["reached"] and obs["killed"]
    assert obs["refused_rc"] == 1 and obs["refusal_names_file"] and obs["refusal_mentions_flag"], obs["stderr"]
    assert obs["bad_step"] == 6 and obs["resumed_from"] == 4 and obs["fallback_names_file"]
    _resumed_exactly(obs)


def test_kill_mid_checkpoint_write_never_loads_the_partial(ref, tmp_path):
    """Killed while writing checkpoint 6 (weights and optimizer written, manifest not): resume uses step 4."""
    obs = harness.crash_in_training(ref, tmp_path, "ckpt.mid_write", 3)
    assert obs["reached"] and obs["killed"]
    assert obs["partial_dirs"] == 1 and obs["partial_loaded"] == 0
    assert obs["resumed_from"] == 4 and obs["newest_complete_used"]
    assert obs["temps_left"] == 0  # the next save cleaned the dead writer's temp dir
    _resumed_exactly(obs)


def test_kill_mid_export(ref, tmp_path):
    """Killed with the warm stage's export complete in its temp dir: no export, then a complete, equal one."""
    obs = harness.crash_in_export(ref, tmp_path, 1)
    assert obs["reached"] and obs["killed"]
    assert obs["export_absent"] and obs["export_temp"] == 1
    assert obs["resumed_from"] == 8 and obs["exports_equal"] and obs["temps_left"] == 0
    _resumed_exactly(obs)


def test_kill_mid_tokenization(ref, tmp_path):
    """Killed writing the 2nd source's tokens into a fresh cache: the 1st is complete, the 2nd only a temp dir;
    the resumed run reuses the one and redoes the other, byte-equal to the reference cache."""
    obs = harness.crash_in_tokenize(ref, tmp_path, 2)
    assert obs["reached"] and obs["killed"]
    assert obs["complete_after_crash"] == 1 and obs["partial_after_crash"] == 1 and obs["partial_only_temp"]
    assert obs["shards_equal"] and obs["temps_left"] == 0
    _resumed_exactly(obs)


def test_disk_full_keeps_the_previous_checkpoint(ref, tmp_path):
    """ENOSPC injected while writing checkpoint 4, then a real RLIMIT_FSIZE (EFBIG) failure writing it again:
    exit 1 with a message naming the path, checkpoint 2 intact, no temp dirs; then a clean resume."""
    obs = harness.disk_full(ref, tmp_path, 2)
    assert obs["reached"] and obs["enospc_rc"] == 1 and obs["enospc_message"], obs["stderr"]
    assert obs["enospc_previous_intact"] and obs["enospc_temps_left"] == 0
    assert obs["efbig_rc"] == 1 and obs["efbig_message"], obs["stderr"]
    assert obs["efbig_previous_intact"] and obs["efbig_temps_left"] == 0
    _resumed_exactly(obs)


def test_disk_full_while_exporting_is_a_clear_error_and_the_rerun_exports(ref, tmp_path):
    obs = harness.disk_full_in_export(ref, tmp_path, 1)
    assert obs["reached"] and obs["rc"] == 1 and obs["message"] and not obs["traceback"], obs["stderr"]
    assert obs["export_absent"] and obs["temps_after_failure"] == 0 and obs["final_checkpoint_kept"]
    assert obs["resume_rc"] == 0 and obs["exports_equal"]
    assert obs["steps_equal"] and obs["losses_equal"] and obs["max_abs_diff"] == 0.0


def test_nan_rollback_replays_exactly_and_logs_the_batch(ref, tmp_path):
    """NaN gradients injected at step 5: `rollback` restores checkpoint 4, replays, skips the batch; its losses
    equal the `skip` run's, the skipped batch's documents are logged in both, and every batch counts."""
    obs = harness.nan_rollback(ref, tmp_path, 5)
    assert obs["reached"] and obs["resume_rc"] == 0, obs.get("stderr")
    assert obs["skip_rows"] == [(5, "nonfinite")] and obs["rollback_rows"] == [(5, "rollback")]
    assert obs["rollbacks"] == [(5, 4, "nonfinite")]
    assert obs["docs_logged"] and obs["losses_before_equal_reference"]
    assert obs["losses_equal"] and obs["max_abs_diff"] == 0.0
    assert obs["tokens_consumed"] == obs["planned_tokens"]
    assert obs["report_lists_skip"]


def test_kill_mid_curation(tmp_path):
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    obs = harness.crash_in_curation(tmp_path, 10)
    assert obs["reached"] and obs["killed"] and not obs["success_after_crash"]
    assert obs["resume_rc"] == 0 and obs["success"], obs["stderr"]
    assert obs["curated_equal"], obs
