"""The build-once cache: its lock dies with its owner and the owner's forked workers, a waiting
process says what it waits for, a killed builder's leftovers go, a damaged folder is rebuilt."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import h64lm.data.cache as cache_module
from h64lm.data.cache import build_once, file_lock
from h64lm.data.integrity import check_manifest, write_manifest
from tests.helpers import ROOT

# A builder that forks a worker (as datasets.map does) and is then SIGKILLed mid-build.
_FORK_THEN_DIE = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from h64lm.data.cache import build_once

def build(tmp):
    (tmp / "half.bin").write_bytes(b"12")
    worker = os.fork()
    if worker == 0:
        time.sleep(60)
        os._exit(0)
    Path({pidfile!r}).write_text(str(worker))
    os.kill(os.getpid(), signal.SIGKILL)

build_once(Path({final!r}), build)
"""


def _lock_is_free(path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_builder_with_a_forked_worker_frees_the_lock(tmp_path):
    final, pidfile = tmp_path / "corpus", tmp_path / "worker.pid"
    code = _FORK_THEN_DIE.format(root=str(ROOT), pidfile=str(pidfile), final=str(final))
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    worker = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(worker) and time.monotonic() < deadline:  # PR_SET_PDEATHSIG
        time.sleep(0.05)
    assert _gone(worker), "the orphaned worker outlived its parent"
    assert _lock_is_free(tmp_path / "corpus.lock")
    assert [p.name for p in tmp_path.glob("corpus.tmp-*")]  # the killed build's leftovers...
    build_once(final, lambda folder: (folder / "whole.bin").write_bytes(b"1234"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "corpus.lock", "worker.pid"]


def test_a_waiting_process_says_which_lock_and_which_pid(tmp_path, monkeypatch, capfd):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
         f"from pathlib import Path\nfrom h64lm.data.cache import file_lock\n"
         f"with file_lock(Path({str(lock)!r})):\n    print('held', flush=True)\n"
         f"    time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setattr(cache_module, "REPORT_EVERY_S", 0.3)
    with file_lock(lock, ": building x"):
        pass
    holder.wait(timeout=30)
    waits = [line for line in capfd.readouterr().err.splitlines() if line.startswith("waiting")]
    assert waits and all(f"the lock {lock} (held by pid {holder.pid} (running)): building x"
                         in line for line in waits), waits


def test_lock_owner_names_an_exited_owner(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("999999999 12345\n")
    assert cache_module.lock_owner(lock).startswith("pid 999999999, which has exited")


@pytest.mark.parametrize("how", ["cut", "rewrite", "delete", "manifest"])
def test_manifest_catches_damage_and_a_damaged_folder_is_rebuilt(tmp_path, capfd, how):
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "a.bin").write_bytes(bytes(range(200)) * 50)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.json").write_text('{"k": 1}')

    final, _ = build_once(tmp_path / "c", build)
    assert check_manifest(final) is None and check_manifest(final, full=True) is None
    target = final / "a.bin"
    if how == "cut":
        target.write_bytes(target.read_bytes()[:-1])
    elif how == "rewrite":
        target.write_bytes(target.read_bytes()[::-1])  # same size, other content
    elif how == "delete":
        (final / "sub" / "b.json").unlink()
    else:
        (final / "manifest.json").write_text("[")
    problem = check_manifest(final)
    assert problem is not None
    assert build_once(tmp_path / "c", build) == (final, True) and len(builds) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"cache: {final} is damaged ({problem}); rebuilding it"]
    assert check_manifest(final) is None


def test_sampled_check_of_large_files(tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES only sampled blocks are read: a rewritten block is caught."""
    import h64lm.data.integrity as integrity

    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 1000)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 64)
    monkeypatch.setattr(integrity, "SAMPLED_BLOCKS", 4)
    (tmp_path / "big.bin").write_bytes(os.urandom(10_000))
    write_manifest(tmp_path)
    entry = json.loads((tmp_path / "manifest.json").read_text())["files"]["big.bin"]
    assert "sampled_crc32" in entry
    data = bytearray((tmp_path / "big.bin").read_bytes())
    data[5000] ^= 1  # inside no sampled block (blocks start at 0, 3312, 6624, 9936)
    (tmp_path / "big.bin").write_bytes(bytes(data))
    assert check_manifest(tmp_path) is None
    assert "CRC-32 mismatch" in check_manifest(tmp_path, full=True)
    data[9999] ^= 1  # inside the last block
    (tmp_path / "big.bin").write_bytes(bytes(data))
    assert "CRC-32 mismatch" in check_manifest(tmp_path)
