"""FSDP2 on 2 gloo processes trains exactly like one process on the same global batch."""

import pytest

from tests.parallel.harness import full_weights_summary, spawn, train


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


def test_init_hook_reaches_every_shard_under_fsdp_and_expert_parallel(tmp_path):
    """`prepare` (train.init_from's hook) edits the full model on rank 0 before it is split: the
    gathered weights of a 2-process FSDP + EP=2 build equal a one-process build with the same edit."""
    reference = full_weights_summary({}, "single", 1, True)
    assert reference != full_weights_summary({}, "single", 1, False)  # the edit shows
    for run in spawn(full_weights_summary, 2, tmp_path, {}, "fsdp", 2, True):
        assert run.keys() == reference.keys()
        for name, (total, squares) in reference.items():
            assert run[name] == pytest.approx([total, squares], rel=1e-6), name
