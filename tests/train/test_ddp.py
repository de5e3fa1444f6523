"""Two gloo processes under torchrun train like one process with the same global batch."""

import pytest

from tests.helpers import FAST, one_and_two_processes, text_corpus


def test_two_process_ddp_matches_one_process(tmp_path):
    corpus = text_corpus(tmp_path)
    # The Switch loss multiplies two batch means, so it is not additive over ranks (each rank
    # balances its own micro-batch, as in the Switch Transformer); with its coefficient at 0 the
    # two runs must agree to float rounding.
    common = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=4", "train.eval_every=2",
                     "model.router_aux_loss_coef=0"]
    one, two = one_and_two_processes(common, tmp_path)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # One run directory for the whole job: rank 1 wrote nothing of its own.
    assert not (tmp_path / ".hydra").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("one", "two", "corpus.txt")) == []
