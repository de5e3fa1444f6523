"""Filesystem faults during a save: one line naming the path and the cause, the earlier
checkpoints intact and still the ones resumed, the failed save's space given back."""

import errno
import os
import subprocess

import pytest
from torch.distributed.checkpoint import filesystem as dcp_fs

from h64lm.runtime.checkpoint import CheckpointError, find_newest, verify
from tests.helpers import tmpfs
from tests.runtime.checkpoint.helpers import saved_run, tiny


def _save_fails(ckpt, match):
    model, opt = tiny()
    with pytest.raises(CheckpointError, match=match) as info:
        ckpt.save(model, opt, {"step": 9}, 9, final=False)
    assert "\n" not in str(info.value)
    return str(info.value)


def _intact(run_dir):
    ckpts = run_dir / "checkpoints"
    assert find_newest(ckpts, print) == ckpts / "step_0000002"
    verify(ckpts / "step_0000001")
    assert not list(ckpts.glob(".*tmp*"))  # the failed save's files are gone
    assert (ckpts / "last").read_text().strip() == "step_0000002"


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "the disk is full"),
                                        (errno.EROFS, "the file system is read-only"),
                                        (errno.EACCES, "permission denied")])
def test_injected_write_error_is_one_line(tmp_path, monkeypatch, code, cause):
    ckpt = saved_run(tmp_path, steps=(1, 2))

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "checkpoints" / ".step_0000009.tmp" / "__0_0.distcp"))

    monkeypatch.setattr(dcp_fs, "_write_item", failing)  # inside DCP's shard writer
    line = _save_fails(ckpt, cause)
    assert ".step_0000009.tmp" in line
    _intact(tmp_path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that lets this container mount one)."""
    with tmpfs(tmp_path / "disk", "size=2M") as mnt:
        yield mnt


def test_real_full_disk(tiny_disk):
    ckpt = saved_run(tiny_disk, steps=(1, 2))
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 8192))  # less room than one checkpoint
    _save_fails(ckpt, r"could not save checkpoint .*: the disk is full")
    _intact(tiny_disk)


def test_real_read_only_run_directory(tiny_disk):
    ckpt = saved_run(tiny_disk, steps=(1, 2))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    _save_fails(ckpt, r"could not save checkpoint .*: the file system is read-only")
    ckpts = tiny_disk / "checkpoints"
    assert find_newest(ckpts, print) == ckpts / "step_0000002"  # reading needs no write
