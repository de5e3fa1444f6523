"""stage=sft SIGKILLed after a checkpoint: `train.resume=auto` continues to exactly the run that
was never interrupted: every logged number of every step (loss over assistant tokens, validation,
routing against the starting model, exact match), the exact-match table and the final weights."""

from __future__ import annotations

import json
import signal

import pytest

from experiments.fault_procs import ResumeLog, final_weights, kill_and_wait, logged_steps, start_run, wait_until
from h64lm.cli import run
from tests.helpers import run_config
from tests.train.test_stage import SFT
from tests.train.test_stage_parallel import numbers_by_step

# Checkpoints at steps 4 and 8, evaluations (with routing and exact match) at 4 and 8: the kill
# lands after step 5, so the resumed process reruns steps 5-8, an evaluation included.
RUN = SFT + ["train.max_steps=8", "train.save_every=4", "train.eval_every=4", "stage.eval_examples=4"]


@pytest.mark.slow  # three runs of 8 steps with evaluations: over a minute on a shared 2-core CPU
def test_sigkill_then_resume_auto_matches_uninterrupted_sft_run(tmp_path, capsys):
    reference = tmp_path / "reference"
    run(run_config(RUN), reference, RUN)

    run_dir = tmp_path / "run"
    proc = start_run(RUN + [f"hydra.run.dir={run_dir}"], tmp_path, env={"H64LM_FAULT_STEP_DELAY": "0.3"})
    wait_until(lambda: logged_steps(run_dir) >= 5, proc, timeout=300, what="step 5")
    code, _ = kill_and_wait(proc, signal.SIGKILL, timeout=30)
    assert code == -signal.SIGKILL
    assert logged_steps(run_dir) < 8  # killed before the end, not after it
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step_0000004"

    args = RUN + ["train.resume=auto"]
    capsys.readouterr()
    run(run_config(args), run_dir, args)
    log = ResumeLog(capsys.readouterr().out)
    assert log.step == 4 and log.skipped == []

    got, expected = numbers_by_step(run_dir), numbers_by_step(reference)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert "routing.1.top1_changed_from_start" in got[8] and "sft/exact_match" in got[8]
    assert all(got[s] == expected[s] for s in expected), \
        [(s, k) for s in expected for k in expected[s] if got[s].get(k) != expected[s][k]]
    assert json.loads((run_dir / "exact_match.json").read_text()) == \
        json.loads((reference / "exact_match.json").read_text())
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in b)
