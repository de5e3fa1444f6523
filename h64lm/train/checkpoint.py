"""Atomic, checksummed checkpoints that load without running pickled code.

A checkpoint is one dict of tensors and plain Python types (so `torch.load(weights_only=True)`
reads it) written to a temporary file, fsynced, then renamed into place; its SHA-256 sits beside it
in `NAME.sha256`. A file whose checksum is missing or wrong is never loaded by `train.resume=auto`,
which falls back to the newest older checkpoint that verifies.

Layout in `RUN_DIR/checkpoints/`: `step_NNNNNNN.pt` (the last `train.keep_last` kept), `last.pt`
(a hard link to the newest step file), `best.pt` (lowest validation loss).

Runs under FSDP / expert parallelism save sharded directories instead (h64lm/parallel/checkpoint.py,
h64lm/train/sharded.py): `step_NNNNNNN/`, `best/`, and `last`, a one-line file naming the newest
step directory. A run that changes layout on resume may hold both kinds; the step entries of both
count towards `keep_last`, and whichever of `last.pt` / `last` exists names the newest save.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_model
from torch import nn

from h64lm.parallel.checkpoint import ShardedCheckpointError, verify_sharded

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointManager",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "find_resume_checkpoint",
    "resolve_checkpoint_path",
    "load_model_state",
    "save_weights",
    "load_trusted",
    "is_sharded_checkpoint",
    "step_entries",
    "remove_entry",
]

FORMAT_VERSION = 1
_STEP_ENTRY = re.compile(r"^step_(\d+)(\.pt)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


class _HashingWriter(io.RawIOBase):
    """Hash the bytes on their way to disk, so verifying a save costs no second read."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """Call `write(file)` into a temporary file, fsync it, and rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically with its checksum; never touches other files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = {}

    def write(f):
        w = _HashingWriter(f)
        torch.save(state, w)
        digest["sha"] = w.sha.hexdigest()

    try:
        # The sidecar goes last: a crash between the two renames leaves a data file whose checksum
        # does not match, which loading rejects, rather than a partial file that looks whole.
        _write_atomic(path, write)
        _write_atomic(_sidecar(path), lambda f: f.write(f"{digest['sha']}  {path.name}\n".encode()))
        _fsync_dir(path.parent)
    except OSError as e:
        raise CheckpointError(
            f"could not save checkpoint {path}: {e.strerror or e} "
            f"(disk full or not writable?); the earlier checkpoints in {path.parent} are untouched"
        ) from e


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def is_sharded_checkpoint(path: Path) -> bool:
    """A DCP checkpoint directory (complete or not), as opposed to a run directory."""
    return Path(path).is_dir() and (Path(path) / "extras").is_dir()


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` matches the checksum saved beside it (a sharded
    directory: unless its completion marker matches its index)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        try:
            verify_sharded(path)
        except (ShardedCheckpointError, OSError, ValueError) as e:
            raise CheckpointError(str(e)) from e
        return
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; not trusted")
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    actual = _file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: SHA-256 {actual[:12]}... does not match the saved "
            f"{expected[:12] or '(empty)'}... (truncated or modified file)"
        )


def load_checkpoint(path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint dict; `weights_only=True` refuses any pickled object that runs code."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} cannot be read: not a torch.save archive (truncated or foreign file)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects beyond tensors and plain Python "
            f"types, which could run code ({str(e).splitlines()[0][:200]})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not an H64LM checkpoint of format {FORMAT_VERSION} (found {found!r})"
        )
    return state


def step_entries(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step file and sharded step directory, newest first."""
    matches = ((_STEP_ENTRY.match(p.name), p) for p in Path(ckpt_dir).glob("step_*"))
    found = [(int(m.group(1)), p) for m, p in matches if m and (p.is_dir() == (m.group(2) is None))]
    return sorted(found, reverse=True)


def remove_entry(path: Path) -> None:
    """Delete a checkpoint file with its checksum, or a sharded directory."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def _last_pointer(ckpt_dir: Path) -> list[Path]:
    """The step directory that `last` names (sharded runs), if any."""
    pointer = ckpt_dir / "last"
    return [ckpt_dir / pointer.read_text().strip()] if pointer.is_file() else []


def find_resume_checkpoint(ckpt_dir: Path, log=print, include_best: bool = False) -> Path | None:
    """The newest checkpoint in `ckpt_dir` that verifies (`best.pt` / `best/` last, with
    `include_best`); says which ones it skipped and why."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / "last.pt", *_last_pointer(ckpt_dir)] + [p for _, p in step_entries(ckpt_dir)]
    candidates += [ckpt_dir / "best.pt", ckpt_dir / "best"] if include_best else []
    for path in candidates:
        if not path.exists():
            continue
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"resume: skipping {path.name}: {e}")
    return None


def load_trusted(path: Path, log=print) -> dict[str, Any]:
    """Load a checkpoint, verified against its checksum file when it has one (a file copied
    without it still loads, with a warning)."""
    path = Path(path)
    verify = _sidecar(path).exists()
    if not verify:
        log(f"warning: {path} has no checksum file {_sidecar(path).name}; loading it unverified")
    return load_checkpoint(path, verify=verify)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file or sharded directory, or a run directory (its newest valid checkpoint)."""
    p = Path(path)
    if p.is_dir() and not is_sharded_checkpoint(p):
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = find_resume_checkpoint(ckpt_dir)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {ckpt_dir} (checkpoint={path})")
        return found
    if not p.exists():
        raise CheckpointError(f"checkpoint={path} does not exist (give a checkpoint file or a run directory)")
    return p


def _link(src: Path, dst: Path) -> None:
    """Atomically make `dst` (and its checksum) the same file as `src`, without copying bytes."""
    for s, d in ((src, dst), (_sidecar(src), _sidecar(dst))):
        tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(s, tmp)
        except OSError:
            tmp.write_bytes(s.read_bytes())
        os.replace(tmp, d)


class CheckpointManager:
    """Step checkpoints with `last.pt` and `best.pt`, keeping the newest `keep_last`."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.pt"

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.step_path(step)
        save_checkpoint(state, path)
        _link(path, self.dir / "last.pt")
        (self.dir / "last").unlink(missing_ok=True)  # a sharded run's pointer: last.pt is newer
        for _, old in step_entries(self.dir)[self.keep_last:]:
            remove_entry(old)
        # Half-written files of a killed process (one run directory has one writer): a preempted
        # 7B run would otherwise leave tens of GB behind per kill.
        for stale in self.dir.glob(".*.tmp-*"):
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                stale.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any], step: int) -> Path:
        best = self.dir / "best.pt"
        if self.step_path(step).exists():
            _link(self.step_path(step), best)
        else:
            save_checkpoint(state, best)
        remove_entry(self.dir / "best")  # a sharded run's best, now older
        return best


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes: `module.` (DDP/DataParallel) and `_orig_mod.` (torch.compile)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load weights into `model`; returns (missing, unexpected) keys.

    With `strict`, any missing or unexpected key is an error listing them; otherwise the
    matching tensors load and the caller reports the rest (a partial load).
    """
    result = model.load_state_dict(_strip_prefixes(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return missing, unexpected


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights only, as safetensors (shared tensors such as a tied LM head are stored once)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_model(model, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; the other outputs are 0644
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
