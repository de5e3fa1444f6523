"""The names other modules used before h64lm/runtime/checkpoint held the checkpoints.

`load_trusted(resolve_checkpoint_path(x))` reads any verified checkpoint (a step directory, a run
directory's newest, or a legacy `.pt` file) into one dict with `config` and `model`
(`train.init_from`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from h64lm.runtime.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_model_state,
    read_full_state,
)
from h64lm.runtime.checkpoint import resolve as resolve_checkpoint_path

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_model_state", "resolve_checkpoint_path", "load_trusted"]


def load_trusted(path: Path, log=print) -> dict[str, Any]:
    """A verified checkpoint's whole state in this process (rank 0's extras, full `model`)."""
    return read_full_state(Path(path))
