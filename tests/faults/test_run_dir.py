"""A run directory under faults, through `python run.py`: one owner, resume=auto that never
restarts silently, values that cannot work, a quick stop during evaluation, provenance.

The in-process rules are unit-tested in tests/runtime/test_rundir.py; these add the process-level
contract (exit code, one line, a directory left byte-identical) with the trials
experiments/faults.py counts (experiments/run_faults.py).
"""

from __future__ import annotations

import shutil

import pytest

from experiments import run_faults as rf
from experiments.fault_procs import FAST, run_cli


def _check(outcome: rf.Outcome) -> None:
    assert outcome.ok, outcome.note
    assert not outcome.lost, outcome.note


def test_every_checkpoint_corrupt_is_refused_with_exit_4_and_nothing_changes(tmp_path, base_args, reference):
    _check(rf.all_corrupt_refused(tmp_path, base_args, reference))


def test_a_resume_of_a_finished_run_exits_2_and_changes_nothing(tmp_path, base_args, reference):
    _check(rf.finished_resume_refused(tmp_path, base_args, reference))


def test_a_value_the_schema_rejects_leaves_an_existing_run_byte_identical(tmp_path, base_args, reference):
    """The launch record Hydra wrote for the refused launch goes too (it used to stay behind)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = rf.snapshot(run_dir)
    proc = run_cli(base_args + ["optim.lr=nan", "train.resume=auto", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: optim.lr=nan must be a finite number"
    after = rf.snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}


def test_online_logging_without_credentials_exits_2_before_any_work(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = run_cli(FAST + ["logger=wandb", "logger.mode=online", f"hydra.run.dir={run_dir}"], tmp_path,
                   env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no_netrc"), "H64LM_CACHE_DIR": str(cache)})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: logger.mode=online needs W&B credentials")
    assert not cache.exists() and not run_dir.exists()  # refused before the tokenizer; no trace left


def test_every_step_nonfinite_in_a_short_run_ends_diverged(tmp_path, base_args):
    _check(rf.every_step_nonfinite(tmp_path, base_args))


@pytest.mark.slow  # ~35 s: six process starts
def test_values_that_cannot_work_exit_2_in_one_line(tmp_path):
    outcomes = rf.bad_value_launches(tmp_path)
    assert len(outcomes) == 6
    for outcome in outcomes:
        _check(outcome)


@pytest.mark.slow  # ~60 s: two runs at once, a killed run, four launches on the result
def test_one_owner_per_run_dir_and_provenance(tmp_path, base_args, reference):
    _check(rf.two_launches_at_once(tmp_path, base_args, reference))
    for outcome in rf.provenance_trials(tmp_path / "one_owner", base_args):
        _check(outcome)
    _check(rf.stale_lock_taken_over(tmp_path, base_args, reference))


@pytest.mark.slow  # ~15 s
def test_sigterm_during_a_long_evaluation_stops_within_seconds(tmp_path, base_args, reference):
    _check(rf.stop_during_evaluation(tmp_path, base_args, reference))
