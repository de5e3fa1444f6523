"""The layouts written before h64lm/runtime/checkpoint existed.

- One-process files `step_NNNNNNN.pt` / `last.pt` / `best.pt`: one `torch.save` dict (model,
  optimizer and the plain extras) with its SHA-256 in `NAME.sha256`. That hash covers every byte,
  so such a file is verified as well as a manifest would; it is read with `weights_only=True`.
- DCP directories of the previous sharded layout (`.complete` marker, no `manifest.json`): only
  their `.metadata` was checksummed, so they are refused until `python -m h64lm.runtime.checkpoint
  upgrade DIR` has checked them and written a manifest (h64lm/runtime/checkpoint/__main__.py).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .manifest import MANIFEST

__all__ = ["FORMAT_VERSION", "is_legacy_file", "is_legacy_dcp", "verify_legacy_file", "load_legacy_file",
           "upgrade_command", "load_plain"]

FORMAT_VERSION = 1  # the `format_version` of a checkpoint's extras, in every layout
OLD_MARKER = ".complete"


def is_legacy_file(path: Path) -> bool:
    return Path(path).suffix == ".pt"


def is_legacy_dcp(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not (path / MANIFEST).exists() and (path / OLD_MARKER).exists()


def upgrade_command(path: Path) -> str:
    return f"python -m h64lm.runtime.checkpoint upgrade {path}"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def verify_legacy_file(path: Path) -> None:
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}; not trusted "
                              "(copy it along with the checkpoint)")
    text = sidecar.read_bytes().decode(errors="replace").split()
    expected = text[0] if text else ""
    if _sha256(path) != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match {sidecar.name} "
                              "(truncated or modified file)")


def load_plain(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain Python types only, one line otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it holds pickled objects beyond tensors and plain "
                              f"Python types, which could run code ({str(e).splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read: {str(e).splitlines()[0][:160]}") from None


def load_legacy_file(path: Path) -> dict[str, Any]:
    """The whole state dict of a verified legacy file; only tensors and plain Python types."""
    path = Path(path)
    verify_legacy_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} cannot be read: not a torch.save archive")
    state = load_plain(path)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an H64LM checkpoint of format {FORMAT_VERSION} (found {found!r})")
    return state
