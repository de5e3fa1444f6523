"""NaN/Inf in the loss or the gradients: the step is skipped and counted; `train.max_bad_steps` in
a row stop the run with the last good state saved; fp16 overflow is the scaler's business."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.fault_inject import poison_training_forward
from h64lm.cli import EXIT_DIVERGED, main, run
from h64lm.runtime.checkpoint import read_extras, read_full_state
from h64lm.train.metrics import read_metrics
from tests.helpers import compose_cfg, run_config


@pytest.fixture
def poison():
    undo = []
    yield lambda **kw: undo.append(poison_training_forward(**kw))
    for u in undo:
        u()


def _ckpt(run_dir, step):
    return read_full_state(run_dir / "checkpoints" / f"step_{step:07d}")


def _same_weights(a, b) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bad_steps_are_skipped_and_counted(tmp_path, base_args, poison):
    poison(loss_steps={3}, grad_steps={6})
    args = base_args + ["train.save_every=1", "train.keep_last=8"]
    best_val_loss = run(run_config(args), tmp_path, args)
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert math.isfinite(records[6]["loss"])  # only its gradients were bad
    for step in (3, 6):  # a skipped step leaves weights and optimizer moments untouched
        before, after = _ckpt(tmp_path, step - 1), _ckpt(tmp_path, step)
        assert _same_weights(before, after)
        states = before["optim"]["state"], after["optim"]["state"]  # Muon momenta, AdamW moments, by name
        assert states[0] and all(states[0][n][k].equal(states[1][n][k]) for n in states[0] for k in states[0][n])
    assert not _same_weights(_ckpt(tmp_path, 3), _ckpt(tmp_path, 4))  # training went on
    assert math.isfinite(best_val_loss)


def test_too_many_bad_steps_stop_with_last_good_state(tmp_path, base_args, monkeypatch, poison,
                                                      capsys):
    poison(loss_steps=set(range(3, 100)), value=float("inf"))
    args = base_args + ["train.save_every=1", "train.keep_last=8", "train.max_bad_steps=3"]
    monkeypatch.setattr("h64lm.cli._hydra_run_info", lambda: (tmp_path, args, None, None))
    with pytest.raises(SystemExit) as stopped:
        main(compose_cfg(args))
    assert stopped.value.code == EXIT_DIVERGED
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: loss or gradients were NaN/Inf for 3 steps in a row (step 5)")
    for advice in ("optim.lr", "hardware.precision=bf16", "train.resume=auto"):
        assert advice in line
    assert _same_weights(_ckpt(tmp_path, 5), _ckpt(tmp_path, 2))  # the last good weights
    assert read_extras(tmp_path / "checkpoints" / "step_0000005")["skipped_steps"] == 3


def test_fp16_overflow_is_left_to_the_scaler(tmp_path, base_args, poison):
    """Inf gradients for twice `max_bad_steps` steps: the scaler halves its scale each time and
    the run goes on; none of it counts as a bad step."""
    overflowing = set(range(2, 8))
    poison(grad_steps=overflowing, value=float("inf"))
    args = base_args + ["hardware.precision=fp16", "train.max_bad_steps=3"]
    run(run_config(args), tmp_path, args)
    state = read_extras(tmp_path / "checkpoints" / "step_0000008")
    assert state["step"] == 8 and state["skipped_steps"] == 0
    assert state["scaler"]["scale"] == 2.0**16 / 2 ** len(overflowing)  # GradScaler's defaults
