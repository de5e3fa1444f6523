"""`manifest.json`: size and SHA-256 of every file of a checkpoint, written last, checked first.

Nothing in a checkpoint directory is read (not even DCP's pickled `.metadata`) before every file
the manifest lists has its recorded size and hash, so a flipped byte anywhere, a missing or
truncated shard or a foreign file is refused before it can reach the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointError

__all__ = ["MANIFEST", "FORMAT", "VERSION", "file_digest", "write_manifest", "read_manifest",
           "verify_manifest"]

MANIFEST = "manifest.json"
FORMAT, VERSION = "h64lm-checkpoint", 2
_CHUNK = 1 << 22


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a regular file (a symlink is refused: it could point anywhere)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a symlink or device); not trusted")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return {"size": st.st_size, "sha256": sha.hexdigest()}


def write_manifest(directory: Path, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    """`files`: {relative path: file_digest}. Written atomically, fsynced."""
    body = {"format": FORMAT, "version": VERSION, **info, "files": dict(sorted(files.items()))}
    tmp = Path(directory) / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(directory) / MANIFEST)


def _bad(directory: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{directory}: {why}")


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked for shape (a JSON object of the expected format) but not the files."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise _bad(directory, f"no {MANIFEST}: the save did not finish (or an older layout)")
    try:
        body = json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise _bad(directory, f"{MANIFEST} is not readable JSON ({type(e).__name__})") from None
    files = body.get("files") if isinstance(body, dict) else None
    if (not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(files, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                       and isinstance(v.get("sha256"), str) for v in files.values())):
        raise _bad(directory, f"{MANIFEST} is not an H64LM checkpoint manifest (wrong shape)")
    if body.get("version") != VERSION:
        raise _bad(directory, f"{MANIFEST} has version {body.get('version')!r}, this code reads {VERSION}")
    return body


def _inside(directory: Path, name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise _bad(directory, f"{MANIFEST} lists {name!r}, which is outside the checkpoint")
    return directory / rel


def verify_manifest(directory: Path, required: Iterable[str] = ()) -> dict[str, Any]:
    """-> the manifest once every listed file matches its size and hash; CheckpointError naming the
    first file that does not. `required`: names that must be listed (e.g. `.metadata`)."""
    directory = Path(directory)
    if Path(directory).is_symlink():
        raise _bad(directory, "is a symlink; a checkpoint directory must be a real directory")
    body = read_manifest(directory)
    for name in required:
        if name not in body["files"]:
            raise _bad(directory, f"{MANIFEST} does not list {name}")
    for name, expected in body["files"].items():
        path = _inside(directory, name)
        if not path.exists() and not path.is_symlink():
            raise _bad(directory, f"{name} is missing")
        actual = file_digest(path)
        if actual["size"] != expected["size"]:
            raise _bad(directory, f"{name} has {actual['size']} bytes, the manifest says {expected['size']} "
                                  "(truncated or replaced)")
        if actual["sha256"] != expected["sha256"]:
            raise _bad(directory, f"{name} does not match its SHA-256 in {MANIFEST} (damaged)")
    return body
