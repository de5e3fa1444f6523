"""Which checkpoint to trust: verification of any layout, and the newest one that verifies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError
from .layout import candidates
from .legacy import is_legacy_dcp, is_legacy_file, upgrade_command, verify_legacy_file
from .manifest import MANIFEST, read_manifest, verify_manifest

__all__ = ["verify", "is_checkpoint", "find_newest", "resolve"]

METADATA = ".metadata"
_verified: dict[str, tuple] = {}  # path -> stat fingerprint of a directory verified by this process


def _fingerprint(path: Path, manifest: dict[str, Any]) -> tuple:
    files = [MANIFEST, *manifest["files"]]
    return tuple((n, st.st_size, st.st_mtime_ns, st.st_ino) for n in files for st in [os.lstat(path / n)])


def verify(path: Path) -> None:
    """CheckpointError (one line naming the file and the damage) unless every byte of the
    checkpoint at `path` matches what its writer recorded. A directory verified once by this
    process is not hashed again while none of its files changed (stat)."""
    path = Path(path)
    if is_legacy_file(path):
        verify_legacy_file(path)
        return
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symlink; a checkpoint must live in its run directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_legacy_dcp(path):
        raise CheckpointError(f"{path} is a sharded checkpoint of the previous layout, verified only in part; "
                              f"check it and adopt it with `{upgrade_command(path)}`")
    cached = _verified.get(str(path))
    if cached is not None:
        try:
            if _fingerprint(path, read_manifest(path)) == cached:
                return
        except (OSError, CheckpointError):
            pass
    manifest = verify_manifest(path, required=(METADATA,))
    _verified[str(path)] = _fingerprint(path, manifest)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint (any layout, complete or not), as opposed to a run directory."""
    path = Path(path)
    return is_legacy_file(path) or (path.is_dir() and any(
        (path / n).exists() for n in (MANIFEST, METADATA, "extras")))


def find_newest(ckpt_dir: Path, log: Callable[[str], None] = print, include_best: bool = False) -> Path | None:
    """The newest checkpoint in `ckpt_dir` that verifies (`best` last, with `include_best`); one
    line for each one skipped, saying why."""
    for path in candidates(ckpt_dir, log, include_best):
        try:
            verify(path)
            return path
        except (CheckpointError, OSError) as e:
            log(f"resume: skipping {path.name}: {e}")
    return None


def resolve(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """A verified checkpoint: `path` itself, or a run directory's newest that verifies."""
    p = Path(path)
    if p.is_dir() and not is_checkpoint(p):
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = find_newest(ckpt_dir, log)
        if found is None:
            raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies (checkpoint={path})")
        return found
    if not p.exists():
        raise CheckpointError(f"checkpoint={path} does not exist (give a checkpoint or a run directory)")
    verify(p)
    return p
