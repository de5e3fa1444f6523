"""Names in `RUN/checkpoints/` and the `last` pointer.

  step_NNNNNNN/   one checkpoint (the newest `train.keep_last` kept), any world size or strategy
  best/           the lowest validation loss (hard links to its step directory when it was saved)
  last            one line naming the newest step directory (a hint: every step entry is a candidate)
  .NAME.tmp/      a save in progress; renamed to NAME only once complete and listed in its manifest
Entries of the previous layouts (`step_NNNNNNN.pt`, `last.pt`, `best.pt` with `.sha256` sidecars)
are still read (h64lm/runtime/checkpoint/legacy.py) and count towards `train.keep_last`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable

__all__ = ["step_name", "step_entries", "read_last_pointer", "write_last_pointer", "candidates",
           "remove_entry", "prune", "remove_stale_temporaries", "fsync_dir", "BEST", "LAST"]

BEST, LAST = "best", "last"
_STEP_ENTRY = re.compile(r"^step_(\d+)(\.pt)?$")
_POINTER_MAX = 256


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_entries(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step directory and legacy step file, newest first (symlinks left out:
    an entry must live in the run directory)."""
    found = []
    for p in Path(ckpt_dir).glob("step_*"):
        m = _STEP_ENTRY.match(p.name)
        if m and not p.is_symlink() and p.is_dir() == (m.group(2) is None):
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def read_last_pointer(ckpt_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The step directory `last` names, or None (with one line) when it is not a short text file
    holding one bare step name: a pointer cannot lead outside the run directory."""
    pointer = Path(ckpt_dir) / LAST
    try:
        st = os.lstat(pointer)
    except FileNotFoundError:
        return None
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file (a symlink or directory)"
    elif st.st_size > _POINTER_MAX:
        why = f"is {st.st_size} bytes, not a one-line pointer"
    else:
        try:
            name = pointer.read_bytes().decode("ascii").strip()
        except (UnicodeDecodeError, OSError):
            name, why = "", "is not text"
        if why is None and not (_STEP_ENTRY.match(name) and not name.endswith(".pt")):
            why = f"names {name[:60]!r}, not a step directory of this run"
    if why:
        log(f"resume: ignoring {pointer}: it {why}")
        return None
    return Path(ckpt_dir) / name


def write_last_pointer(ckpt_dir: Path, name: str) -> None:
    tmp = Path(ckpt_dir) / f".{LAST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(ckpt_dir) / LAST)


def candidates(ckpt_dir: Path, log: Callable[[str], None], include_best: bool) -> list[Path]:
    """Every checkpoint worth trying, newest first: what `last` names, the legacy `last.pt`, every
    step entry, then (with `include_best`) `best/` and the legacy `best.pt`."""
    ckpt_dir = Path(ckpt_dir)
    pointed = read_last_pointer(ckpt_dir, log)
    found = [p for p in (pointed, ckpt_dir / "last.pt") if p is not None]
    found += [p for _, p in step_entries(ckpt_dir)]
    if include_best:
        found += [ckpt_dir / BEST, ckpt_dir / "best.pt"]
    unique, seen = [], set()
    for p in found:
        if p not in seen and (p.exists() or p.is_symlink()):
            seen.add(p)
            unique.append(p)
    return unique


def remove_entry(path: Path) -> None:
    """Delete a checkpoint directory, or a legacy file with its checksum sidecar."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step entries; a legacy `last.pt` link is older than any new save."""
    for _, old in step_entries(ckpt_dir)[keep_last:]:
        remove_entry(old)
    remove_entry(Path(ckpt_dir) / "last.pt")


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Half-written saves of a killed process (one run directory has one writer, and no save of
    this process is in flight when this runs): a preempted large run would leave GBs per kill."""
    for stale in Path(ckpt_dir).glob(".*.tmp*"):
        remove_entry(stale)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
