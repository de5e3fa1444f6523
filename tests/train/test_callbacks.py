"""Callbacks see the loop from outside; a NaN router bias ends the run like a NaN loss."""

import math

import pytest
import torch

from h64lm.model.moe import moe_layers
from h64lm.runtime.control import TrainingDiverged
from h64lm.runtime.distributed import Dist
from h64lm.train.callbacks import Callback, default_callbacks
from h64lm.train.loop import Trainer
from tests.helpers import run_config
from tests.train.test_parallel_fast import ARGS, masked_stage

ONE = Dist(0, 1, torch.device("cpu"))


class Spy(Callback):
    """Records what the trainer tells it; from `poison_at` on, makes every router bias NaN."""

    def __init__(self, poison_at=None):
        self.records, self.ends, self.poison_at = [], [], poison_at

    def on_record(self, trainer, record, is_eval):
        self.records.append((record["step"], is_eval, "val_loss" in record))
        if self.poison_at is not None and trainer.step >= self.poison_at:
            with torch.no_grad():
                for layer in moe_layers(trainer.model).values():
                    layer.router.bias.fill_(math.nan)

    def on_fit_end(self, trainer, state, summary):
        self.ends.append((state, summary is not None))


def test_a_callback_sees_every_step_and_the_end(tmp_path):
    args = ARGS + ["hardware=cpu", "train.batch_size=4", "train.max_steps=3", "train.eval_every=2"]
    spy = Spy()
    run = run_config(args)
    summary = Trainer(run, tmp_path, args, ONE, stage=masked_stage, callbacks=default_callbacks(run) + [spy]).fit()
    assert spy.records == [(1, False, False), (2, True, True), (3, True, True)]
    assert spy.ends == [("finished", True)] and summary["step"] == 3


def test_nan_router_bias_diverges_with_the_muon_advice(tmp_path):
    args = ARGS + ["hardware=cpu", "train.batch_size=4", "train.max_steps=8", "train.eval_every=8",
                   "train.save_every=8", "train.max_bad_steps=2", "model.router_bias_update_rate=0.01",
                   "optim=muon"]
    spy = Spy(poison_at=2)
    with pytest.raises(TrainingDiverged, match="or router biases were NaN/Inf for 2 steps in a row") as err:
        Trainer(run_config(args), tmp_path, args, ONE, stage=masked_stage, callbacks=[spy]).fit()
    assert "optim.muon_lr" in str(err.value)
    assert [s for s, _, _ in spy.records] == [1, 2, 3]  # steps 3 and 4 are bad: stop after step 4's check
    assert spy.ends == [("diverged", False)]
    assert (tmp_path / "checkpoints" / "step_0000004").is_dir()


def test_too_little_text_for_downstream_tasks_is_refused_before_the_first_step(tmp_path):
    from h64lm.cli import run
    from tests.helpers import FAST, text_corpus

    args = FAST + ["data=text", f"data.path={text_corpus(tmp_path)}", "train.downstream_every=1",
                   "train.downstream_limit=100000"]
    with pytest.raises(ValueError, match=r"^train.downstream_every: .* fewer than train.downstream_limit=100000"):
        run(run_config(args), tmp_path / "run", args)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
