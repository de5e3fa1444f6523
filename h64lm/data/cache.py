"""Build-once cache folders shared by concurrent processes (DDP ranks, sweep jobs).

A folder is built under a temporary name and renamed into place, so a reader either sees no
folder or a whole one. An exclusive `fcntl.flock` on a sibling lock file lets only one process
build; the others block on the lock and then find the finished folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["build_once", "file_lock"]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return `(final, built_here)`, calling `build(tmp_dir)` only if `final` does not exist yet."""
    if final.is_dir():
        return final, False
    with file_lock(final.with_name(final.name + ".lock")):
        if final.is_dir():
            return final, False
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
