"""Background saves on several processes: their collectives run on the checkpoints' own gloo group
while training steps run theirs, and the run resumes from them exactly (any layout)."""

import json

import pytest

from h64lm.runtime.checkpoint import MANIFEST, verify
from tests.parallel.harness import assert_same_numbers, spawn
from tests.runtime.checkpoint.procs import resume_and_train, train_async_save

STEPS, SAVE_AT = 5, 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy,ep", [("fsdp", 1), ("ddp", 2)], ids=["fsdp", "ddp-ep2"])
def test_background_save_while_training_then_exact_resume(tmp_path, strategy, ep):
    runs = spawn(train_async_save, 2, tmp_path / "save", strategy, ep, STEPS, str(tmp_path / "run"), SAVE_AT)
    # the slow writer kept the save in flight through the 3 later steps and their collectives
    assert all(r["in_flight_after_training"] for r in runs)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    verify(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and {"extras/rank_0.pt", "extras/rank_1.pt"} <= set(manifest["files"])
    assert (tmp_path / "run" / "checkpoints" / "last").read_text().strip() == "step_0000002"
    # one process resumes the 2-process checkpoint and continues as the 2-process run did
    resumed = resume_and_train("single", 1, STEPS, str(ckpt))
    assert resumed["extras"]["step"] == SAVE_AT
    assert_same_numbers(runs[0]["numbers"][SAVE_AT:], resumed["numbers"])
    # and 2 processes of the same layout resume each rank's own extras
    again = spawn(resume_and_train, 2, tmp_path / "load", strategy, ep, STEPS, str(ckpt))
    assert [r["extras"]["rank"] for r in again] == [0, 1]
    assert_same_numbers(runs[0]["numbers"][SAVE_AT:], again[0]["numbers"])
