"""SIGTERM, SIGINT and SIGKILL during a run: the state is saved or the last save is whole, and
`train.resume=auto` continues to exactly the losses and weights of an uninterrupted run.

Corrupt, truncated, malicious and ENOSPC checkpoints are unit-tested in
tests/runtime/checkpoint/; here the process itself dies.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from experiments.fault_procs import (
    ResumeLog,
    differences,
    kill_and_wait,
    logged_steps,
    start_run,
    wait_until,
)
from h64lm.cli import main, run
from h64lm.runtime.checkpoint import read_extras
from h64lm.train.loop import Trainer
from tests.helpers import compose_cfg, run_config

STEP_DELAY = {"H64LM_FAULT_STEP_DELAY": "0.3"}  # slow enough to aim a signal between steps


def _resume(run_dir, base_args, capsys) -> ResumeLog:
    args = base_args + ["train.resume=auto"]
    capsys.readouterr()
    run(run_config(args), run_dir, args)
    return ResumeLog(capsys.readouterr().out)


def test_sigterm_saves_exits_143_and_resume_matches(tmp_path, base_args, reference, capsys):
    run_dir = tmp_path / "run"
    proc = start_run(base_args + [f"hydra.run.dir={run_dir}"], tmp_path, env=STEP_DELAY)
    wait_until(lambda: logged_steps(run_dir) >= 3, proc, timeout=180, what="step 3")
    code, _ = kill_and_wait(proc, signal.SIGTERM, timeout=60)
    assert code == 128 + signal.SIGTERM
    last_line = (tmp_path / "proc.err").read_text().strip().splitlines()[-1]
    assert last_line.startswith("SIGTERM received: saved ") and "train.resume=auto" in last_line
    saved = read_extras(run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip())
    assert f"step_{saved['step']:07d}" in last_line and saved["step"] >= 3
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"

    log = _resume(run_dir, base_args, capsys)
    assert log.step == saved["step"] and log.skipped == []
    assert differences(run_dir, reference) == []


def test_sigint_saves_and_exits_130(tmp_path, base_args, reference, monkeypatch, capsys):
    """In-process: Ctrl-C lands during step 3. The flag travels in the next step's collective
    (all ranks must agree to stop), so step 4 is the one saved."""
    step = Trainer.train_step

    def interrupted_step(self, stop_requested):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, stop_requested)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    run_dir = tmp_path / "run"
    monkeypatch.setattr("h64lm.cli._hydra_run_info", lambda: (run_dir, base_args, None, None))
    with pytest.raises(SystemExit) as stopped:
        main(compose_cfg(base_args))
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("SIGINT received: saved ") and "step_0000004" in err[-1]
    monkeypatch.setattr(Trainer, "train_step", step)

    log = _resume(run_dir, base_args, capsys)
    assert log.step == 4
    assert differences(run_dir, reference) == []


# Random kill moments are the script's job (experiments/faults.py, 5+ trials); the default suite
# keeps the deliberate kill inside a checkpoint write.
@pytest.mark.parametrize("moment", [pytest.param("between_steps", marks=pytest.mark.slow),
                                    "inside_checkpoint_write"])
def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path, base_args, reference, capsys,
                                                            moment):
    run_dir = tmp_path / "run"
    marker = tmp_path / "inside_save"
    env = dict(STEP_DELAY)
    if moment == "inside_checkpoint_write":
        env.update(H64LM_FAULT_SAVE_MARKER=str(marker), H64LM_FAULT_SAVE_AFTER="2")
    proc = start_run(base_args + [f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    if moment == "inside_checkpoint_write":
        wait_until(marker.exists, proc, timeout=180, what="the step-4 checkpoint write")
    else:
        kill_step = random.Random(7).randint(3, 6)
        wait_until(lambda: logged_steps(run_dir) >= kill_step, proc, timeout=180,
                   what=f"step {kill_step}")
    kill_and_wait(proc, signal.SIGKILL, timeout=30)
    partial = sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))
    if moment == "inside_checkpoint_write":
        assert partial == [".step_0000004.tmp"]  # a half-written save is on disk

    log = _resume(run_dir, base_args, capsys)
    assert log.step in (2, 4, 6) and log.skipped == []
    if moment == "inside_checkpoint_write":
        assert log.step == 2
    assert differences(run_dir, reference) == []
    assert list((run_dir / "checkpoints").glob(".*.tmp")) == []  # the next save cleaned up
