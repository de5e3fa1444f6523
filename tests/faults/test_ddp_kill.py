"""Two gloo processes under torchrun; one is SIGKILLed mid-run. The job must end on its own
within a bounded time (no rank left hanging in a collective) and resume from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from experiments.fault_procs import (
    TORCHRUN,
    ResumeLog,
    logged_steps,
    rank_pids,
    run_losses,
    start_run,
    wait_until,
)
from h64lm.cli import run
from tests.helpers import run_config

DDP = ["train.batch_size=1", "hardware=ddp", "hardware.device=cpu", "hardware.precision=fp32",
       "hardware.timeout_s=30"]
JOB_END_S = 120  # the dead peer's socket closes at once; torchrun then stops the survivor


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


def test_killed_rank_ends_the_job_which_then_resumes(tmp_path, base_args, reference, capsys):
    run_dir = tmp_path / "run"
    proc = start_run(base_args + DDP + [f"hydra.run.dir={run_dir}"], tmp_path, launcher=TORCHRUN,
                     env={"H64LM_FAULT_STEP_DELAY": "0.3"})
    wait_until(lambda: logged_steps(run_dir) >= 3, proc, timeout=240, what="step 3 of the DDP job")
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    try:
        code = proc.wait(timeout=JOB_END_S)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert code != 0 and not _alive(ranks[0])
    survivor = (tmp_path / "proc.err").read_text()
    # One line from the survivor: its collective failed (exit 5), or torchrun's SIGTERM arrived
    # first and it saved and stopped (exit 143); never a bare gloo traceback alone.
    assert ("error: another process of this job failed" in survivor
            or "SIGTERM received: saved" in survivor), survivor[-2000:]

    # The same global batch (1 sequence x 2 ranks = 2 x 1) on one process: the job goes on where
    # its last checkpoint left it (the script resumes it under torchrun instead).
    args = base_args + ["train.resume=auto"]
    capsys.readouterr()
    run(run_config(args), run_dir, args)
    log = ResumeLog(capsys.readouterr().out)
    assert log.step >= 2 and log.skipped == []
    ddp, ref = run_losses(run_dir), run_losses(reference)
    assert sorted(ddp) == sorted(ref)
    for step in ref:  # DDP sums gradients in another order: equal up to rounding
        assert ddp[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
        assert ddp[step]["tokens"] == ref[step]["tokens"]
