"""Two gloo processes under torchrun; one is SIGKILLed mid-run. The job must end on its own
within a bounded time (no rank left hanging in a collective) and resume from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def accum_reference(tmp_path_factory, base_args) -> Path:
    """The DDP job's arithmetic in one process. Each rank's sequence is one micro-batch of 1
    (`grad_accum=2`): DDP averages the ranks' gradients as (g0 + g1) / 2 and accumulation adds
    g0 / 2 + g1 / 2, equal bit for bit since halving is exact in floating point. One intra-op
    thread, as torchrun gives each of its workers (OMP_NUM_THREADS=1): reductions split over two
    threads round differently. The earlier reference (`batch_size=2`, default threads) differed
    in the last bits at step 1, and training amplified that to 1e-4 by step 7."""
    run_dir = tmp_path_factory.mktemp("accum_reference") / "run"
    args = base_args + ["train.batch_size=1", "train.grad_accum=2", "hardware.num_threads=1"]
    threads = torch.get_num_threads()
    try:
        run(run_config(args), run_dir, args)
    finally:  # the setting is process-wide: later in-process runs must keep the default
        torch.set_num_threads(threads)
    return run_dir


def test_killed_rank_ends_the_job_which_then_resumes(tmp_path, base_args, accum_reference):
    run_dir = tmp_path / "run"
    job = base_args + DDP + [f"hydra.run.dir={run_dir}"]
    proc = start_run(job, tmp_path, launcher=TORCHRUN, env={"H64LM_FAULT_STEP_DELAY": "0.3"})
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

    # The requeued job: the same command with train.resume=auto, under torchrun again.
    again = start_run(job + ["train.resume=auto"], tmp_path, launcher=TORCHRUN, log_name="resumed")
    assert again.wait(timeout=240) == 0, (tmp_path / "resumed.err").read_text()[-2000:]
    log = ResumeLog((tmp_path / "resumed.out").read_text() + (tmp_path / "resumed.err").read_text())
    assert log.step >= 2 and log.skipped == []
    ddp, ref = run_losses(run_dir), run_losses(accum_reference)
    assert ddp == ref  # every logged number of every step, bit for bit: the resume lost nothing
