"""A run directory's owner and its provenance.

One live run per directory: `RunDirLock` holds a POSIX record lock (`lockf`) on `RUN/.lock`. The
kernel drops it when its process dies, however it dies, and unlike `flock` it is not inherited by
forked children (tokenizer workers), so a killed run never leaves a lock behind; the file names
the holder (host, pid, start time) for the refusal message.

Provenance: Hydra writes each launch's composed config and overrides to `.hydra/launches/<time>/`
(`hydra.output_subdir` in conf/config.yaml). The first launch that starts training copies its
record to `.hydra/{config,overrides,hydra}.yaml`, which no later launch touches: they stay the
config the run was trained with. A launch that is refused (bad input, a second copy of the job)
removes its own record, and the directory itself if the launch created it, so it changes nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from h64lm.validation import ConfigError

__all__ = ["RunDirLock", "adopt_launch_record", "discard_launch", "LAUNCHES"]

LAUNCHES = Path(".hydra") / "launches"
_RECORD_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another run is training in {self.path.parent} (lock held by {holder}); wait for it, "
                "stop it, or choose another hydra.run.dir. Nothing was changed") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lockf lock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def adopt_launch_record(run_dir: Path, launch_dir: Path | None) -> None:
    """On the run's first training launch, its record becomes `.hydra/{config,overrides}.yaml`."""
    hydra_dir = Path(run_dir) / ".hydra"
    if launch_dir is None or (hydra_dir / "config.yaml").exists():
        return
    for name in _RECORD_FILES:
        if (launch_dir / name).exists():
            shutil.copy2(launch_dir / name, hydra_dir / name)


def discard_launch(run_dir: Path, launch_dir: Path | None, created: bool) -> None:
    """A refused launch leaves no trace: its record goes, and the directory if it made it."""
    if launch_dir is not None:
        shutil.rmtree(launch_dir, ignore_errors=True)
    run_dir = Path(run_dir)
    if created and run_dir.is_dir():
        leftovers = [p for p in run_dir.rglob("*") if p.is_file() and p.name not in (".lock", "run.log")]
        if not leftovers:
            shutil.rmtree(run_dir, ignore_errors=True)
