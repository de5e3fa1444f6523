"""Build-once cache folders shared by concurrent processes (DDP ranks, sweep jobs).

A folder is built under a temporary name and renamed into place, so a reader either sees no
folder or a whole one. An exclusive `fcntl.flock` on a sibling lock file lets only one process
build; the others wait on the lock and then find the finished folder.

The lock dies with its owner, whatever kills it: the kernel drops a flock when the last file
descriptor of it closes, and a process forked while this one holds a lock (the `datasets.map`
workers) closes its inherited copy at once (`os.register_at_fork`), so a worker outliving a
killed parent cannot keep the lock. Such workers also get SIGKILL when their parent dies
(Linux `PR_SET_PDEATHSIG`), so they do not tokenize on for nobody. The owner writes its pid
into the lock file; a waiting process says every `REPORT_EVERY_S` seconds which lock it waits
for and who holds it. Temporary folders left by a killed builder are removed by the next one.

Every finished folder carries a `manifest.json` (h64lm/data/integrity.py) and is checked when
opened; a damaged one is rebuilt, with one line saying why.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from h64lm.data.integrity import check_manifest, write_manifest

__all__ = ["REPORT_EVERY_S", "build_once", "file_lock", "lock_owner"]

REPORT_EVERY_S = 10.0
_POLL_S = 0.1
_HELD: set[int] = set()  # descriptors of the locks this process holds now
_PR_SET_PDEATHSIG = 1
_forking_pid = [0]


def _after_fork_in_child() -> None:
    if not _HELD:
        return
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # close, never LOCK_UN: that would release the parent's lock too
    _HELD.clear()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking_pid[0]:  # the parent died before the line above took effect
        os._exit(1)


os.register_at_fork(before=lambda: _forking_pid.__setitem__(0, os.getpid()),
                    after_in_child=_after_fork_in_child)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _holders(path: Path) -> list[int]:
    """The pids with `path` open (read from /proc; empty where that is unreadable)."""
    target, pids = str(path.resolve()), []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
    return pids


def lock_owner(path: Path) -> str:
    """Who holds the lock file `path`, in words: the pid it records and whether that still runs."""
    try:
        pid_text, start, *_ = Path(path).read_text().split() + ["", ""]
        pid = int(pid_text)
    except (OSError, ValueError):
        return "an unknown process (no pid recorded)"
    if _start_time(pid) == start:
        return f"pid {pid} (running)"
    others = [p for p in _holders(Path(path)) if p != os.getpid()]
    return (f"pid {pid}, which has exited; processes with the lock file open: "
            f"{others or 'none found'}")


@contextlib.contextmanager
def file_lock(path: Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `path`; while waiting, report on stderr every REPORT_EVERY_S."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        started = last = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - last >= REPORT_EVERY_S:
                    last = now
                    print(f"waiting {now - started:.0f} s for the lock {path} (held by "
                          f"{lock_owner(path)}){what}", file=sys.stderr, flush=True)
                time.sleep(_POLL_S)
        _HELD.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())}\n".encode(), 0)
        try:
            yield
        finally:
            _HELD.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete `folder` by renaming it to a temporary name first, so nobody opens it half-gone."""
    doomed = folder.with_name(f"{folder.name}.tmp-removed-{uuid.uuid4().hex[:8]}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _problem(final: Path, check: Callable[[Path], str | None] | None) -> str | None:
    try:
        return (check(final) if check else None) or check_manifest(final)
    except OSError as err:  # e.g. removed by a process rebuilding it; decided again under the lock
        return f"unreadable: {type(err).__name__}: {err.strerror}"


def build_once(final: Path, build: Callable[[Path], None],
               check: Callable[[Path], str | None] | None = None) -> tuple[Path, bool]:
    """Return `(final, built_here)`, calling `build(tmp_dir)` only if `final` is absent or damaged.

    `check(folder)` returns what is wrong with a finished folder beyond its manifest, or None.
    """
    if final.is_dir() and _problem(final, check) is None:
        return final, False
    with file_lock(final.with_name(final.name + ".lock"), f": building {final.name}"):
        if final.is_dir():
            problem = _problem(final, check)
            if problem is None:
                return final, False  # another process built it while this one waited
            print(f"cache: {final} is damaged ({problem}); rebuilding it",
                  file=sys.stderr, flush=True)
            _remove(final)
        for stale in final.parent.glob(f"{final.name}.tmp-*"):  # a killed builder's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            write_manifest(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
