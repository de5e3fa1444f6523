"""FSDP2 on 2 gloo processes trains exactly like one process on the same global batch."""

import pytest

from tests.parallel.harness import spawn, train


def _assert_same(reference, runs):
    for run in runs:  # every rank reports the same global numbers
        assert len(run) == len(reference)
        for a, b in zip(reference, run):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6)


def test_fsdp_two_processes_match_one(tmp_path):
    reference = train({}, "single", 1, 5)
    assert reference[0]["loss"] != reference[-1]["loss"]  # the steps really train
    _assert_same(reference, spawn(train, 2, tmp_path, {}, "fsdp", 1, 5))


@pytest.mark.slow
def test_fsdp_tied_embeddings_two_processes_match_one(tmp_path):
    reference = train({"tie_word_embeddings": True}, "single", 1, 5)
    _assert_same(reference, spawn(train, 2, tmp_path, {"tie_word_embeddings": True}, "fsdp", 1, 5))
