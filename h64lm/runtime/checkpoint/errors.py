"""The one error type of checkpoints, and the one line an OSError becomes."""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = ["CheckpointError", "os_error_line"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the path (CLI exit 4)."""


_CAUSES = {
    errno.ENOSPC: "the disk is full: free space or point hydra.run.dir at a larger disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or point hydra.run.dir elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable hydra.run.dir",
    errno.EACCES: "permission denied: make it writable or choose another hydra.run.dir",
    errno.EPERM: "operation not permitted: make it writable or choose another hydra.run.dir",
}


def os_error_line(action: str, path: Path, e: OSError) -> str:
    """`could not <action> <path>: <cause>` with the option to change, for any OSError."""
    where = Path(e.filename) if getattr(e, "filename", None) else path
    cause = _CAUSES.get(e.errno, e.strerror or str(e))
    return f"could not {action} {where}: {cause}"
