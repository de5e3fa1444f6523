"""Two gloo processes under torchrun train like one process with the same global batch."""

import sys

import pytest

from h64lm.train.metrics import read_metrics
from tests.helpers import FAST, run_cli, text_corpus


def test_two_process_ddp_matches_one_process(tmp_path):
    corpus = text_corpus(tmp_path)
    # The Switch loss multiplies two batch means, so it is not additive over ranks (each rank
    # balances its own micro-batch, as in the Switch Transformer); with its coefficient at 0 the
    # two runs must agree to float rounding.
    common = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=4", "train.eval_every=2",
                     "model.router_aux_loss_coef=0"]
    single = run_cli(common + ["train.batch_size=2", f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = run_cli(common + ["train.batch_size=1", "hardware=ddp", "hardware.device=cpu",
                               "hardware.precision=fp32", f"hydra.run.dir={tmp_path / 'two'}"],
                     cwd=tmp_path, launcher=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # One run directory for the whole job: rank 1 wrote nothing of its own.
    assert not (tmp_path / ".hydra").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("one", "two", "corpus.txt")) == []
