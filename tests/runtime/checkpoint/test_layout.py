"""`RUN/checkpoints/`: the `last` pointer cannot lead outside the run, pruning, best, no temporaries."""

import os

import pytest

from h64lm.runtime.checkpoint import find_newest, read_extras
from tests.runtime.checkpoint.helpers import saved_run, tiny

POINTERS = {
    "binary": b"\x00\xff\xfe step",
    "parent directory": b"../elsewhere/step_0000009\n",
    "absolute path": b"/tmp/step_0000009\n",
    "huge": b"step_0000001" * 1000,
    "a legacy file name": b"step_0000001.pt\n",
}


@pytest.mark.parametrize("content", list(POINTERS))
def test_bad_last_pointer_is_ignored_with_one_line(tmp_path, content):
    saved_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "last").write_bytes(POINTERS[content])
    lines = []
    assert find_newest(ckpts, lines.append) == ckpts / "step_0000003"
    assert len(lines) == 1 and "ignoring" in lines[0] and "last" in lines[0]


def test_symlinks_out_of_the_run_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    saved_run(outside, steps=(9,))
    saved_run(tmp_path / "run", steps=(1,))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "last").unlink()
    (ckpts / "last").symlink_to(outside / "checkpoints" / "last")
    (ckpts / "step_0000009").symlink_to(outside / "checkpoints" / "step_0000009")
    lines = []
    assert find_newest(ckpts, lines.append) == ckpts / "step_0000001"
    assert any("not a regular file" in line for line in lines)


def test_keep_last_pointer_and_no_temporaries(tmp_path):
    saved_run(tmp_path, steps=(1, 2, 3, 4), keep_last=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_0000003", "step_0000004"]
    assert (ckpts / "last").read_text() == "step_0000004\n"
    (ckpts / ".step_0000005.tmp").mkdir()  # a killed save's leftovers go at the next save
    model, opt = tiny()
    ckpt = saved_run(tmp_path, steps=(), keep_last=2)
    ckpt.save(model, opt, {"step": 5}, 5, final=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_0000004", "step_0000005"]


def test_best_links_the_saved_step_or_saves_itself(tmp_path):
    ckpt = saved_run(tmp_path, steps=(1, 2))
    model, opt = tiny()
    ckpt.save_best(model, opt, {"step": 2}, 2)
    best, step2 = tmp_path / "checkpoints" / "best", tmp_path / "checkpoints" / "step_0000002"
    assert os.stat(best / ".metadata").st_ino == os.stat(step2 / ".metadata").st_ino  # no bytes copied
    assert (tmp_path / "best_model.safetensors").is_file()
    ckpt.save_best(model, opt, {"step": 7}, 7)  # step 7 was never saved: a save of its own
    assert read_extras(best)["step"] == 7
    assert read_extras(step2)["step"] == 2  # the linked step directory is untouched
    assert find_newest(tmp_path / "checkpoints", print, include_best=True) == tmp_path / "checkpoints" / "step_0000002"
