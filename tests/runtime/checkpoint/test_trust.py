"""Verified before trusted: every kind of damage to a checkpoint falls back to the previous one
that verifies, with one line naming what was skipped and why; nothing verifying is None."""

import json
import os

import pytest
import torch

from h64lm.runtime.checkpoint import CheckpointError, find_newest, load_into, resolve, verify
from tests.runtime.checkpoint.helpers import flip_byte, saved_run, tiny


def _shard(step_dir):
    return next(step_dir.glob("__0_*.distcp"))


DAMAGE = {
    "flipped byte inside a model shard": lambda d: flip_byte(_shard(d), _shard(d).stat().st_size // 2),
    "garbage at the start of a shard": lambda d: _shard(d).write_bytes(b"GARBAGE!" + _shard(d).read_bytes()[8:]),
    "missing shard": lambda d: _shard(d).unlink(),
    "truncated extras": lambda d: (d / "extras/rank_0.pt").write_bytes((d / "extras/rank_0.pt").read_bytes()[:40]),
    "damaged extras": lambda d: flip_byte(d / "extras/rank_0.pt", 60),
    "damaged metadata": lambda d: flip_byte(d / ".metadata", 10),
    "manifest of the wrong shape": lambda d: (d / "manifest.json").write_text(json.dumps(["a", "list"])),
    "manifest without files": lambda d: (d / "manifest.json").write_text(json.dumps({"format": "h64lm-checkpoint"})),
    "manifest not JSON": lambda d: (d / "manifest.json").write_bytes(b"\x00\xff{"),
    "manifest missing (save died)": lambda d: (d / "manifest.json").unlink(),
    "shard replaced by a symlink": lambda d: (lambda s: (s.unlink(), s.symlink_to("/etc/hostname")))(_shard(d)),
}
WHY = {"missing shard": "is missing", "truncated extras": "bytes, the manifest says",
       "manifest missing (save died)": "did not finish", "shard replaced by a symlink": "not a regular file"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    saved_run(tmp_path)
    ckpts = tmp_path / "checkpoints"
    DAMAGE[damage](ckpts / "step_0000003")
    lines = []
    assert find_newest(ckpts, lines.append) == ckpts / "step_0000002"
    skipped = [line for line in lines if "step_0000003" in line]
    assert len(skipped) == 1 and "\n" not in skipped[0], lines  # what `last` names, reported once
    assert WHY.get(damage, "") in skipped[0]
    with pytest.raises(CheckpointError):
        verify(ckpts / "step_0000003")
    model, opt = tiny()
    with pytest.raises(CheckpointError):  # a direct load refuses too: nothing reaches the model
        load_into(ckpts / "step_0000003", model, opt)
    assert (ckpts / "step_0000003").is_dir()  # the damaged one is left for inspection, not deleted


def test_nothing_verifies_is_none_and_resolve_refuses(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    for d in (tmp_path / "checkpoints").glob("step_*"):
        flip_byte(_shard(d), 100)
    lines = []
    assert find_newest(tmp_path / "checkpoints", lines.append) is None
    assert len(lines) == 2
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        resolve(tmp_path)


def test_a_verified_load_restores_model_optimizer_and_extras(tmp_path):
    saved_run(tmp_path)
    original, original_opt = tiny()
    with torch.no_grad():
        for _ in range(3):  # as saved_run did before step 3's save
            original[0].weight.add_(1.0)
    model, opt = tiny()
    with torch.no_grad():
        model[0].weight.zero_()
    extras = load_into(resolve(tmp_path), model, opt)
    assert extras["step"] == 3 and extras["note"] == [3, "x"]
    assert torch.equal(model[0].weight, original[0].weight)
    a, b = opt.state_dict()["state"], original_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_verification_is_cached_only_while_files_are_unchanged(tmp_path):
    saved_run(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_0000001"
    verify(step)
    flip_byte(_shard(step), 100)  # same size; the write changes the mtime
    os.utime(_shard(step), ns=(0, 0))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify(step)
