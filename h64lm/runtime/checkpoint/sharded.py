"""Sharded checkpoints of a model (+ optimizer) outside the trainer, in the one layout of
h64lm/runtime/checkpoint (DCP shards, per-rank extras, a manifest of every file): the parallel
tests' harness saves and resumes through these. The trainer uses `Checkpointer` instead."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .errors import CheckpointError
from .manifest import verify_manifest
from .store import begin_save, finish_save, load_into, shard_error, state_of, write_shards
from .weights import consolidated_state_dict, save_consolidated

__all__ = ["ShardedCheckpointError", "SaveHandle", "save_sharded", "load_sharded", "verify_sharded",
           "consolidated_state_dict", "save_consolidated"]

ShardedCheckpointError = CheckpointError


class SaveHandle:
    """A save in flight: `wait()` (on every rank) writes the manifest and renames it into place."""

    def __init__(self, tmp: Path, final: Path, upload: Optional[Future], step: int):
        self.tmp, self.final, self.upload, self.step = tmp, final, upload, step

    def wait(self) -> Path:
        if self.upload is not None:
            upload, self.upload = self.upload, None
            try:
                upload.result()
            except Exception as e:
                raise shard_error(e, self.tmp) from None
            finish_save(self.tmp, self.final, {"step": self.step}, None, replace=True)
        return self.final


def save_sharded(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 extras: Optional[Dict[str, Any]] = None, async_save: bool = False) -> SaveHandle:
    """Collective. With `async_save` (several processes), the state is staged and written in the
    background until `handle.wait()`; otherwise it is complete and in place on return."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    extras = extras or {}
    begin_save(tmp, extras, None)
    background = async_save and torch.distributed.is_initialized()
    upload = write_shards(state_of(model, optimizer), tmp, None, background)
    handle = SaveHandle(tmp, final, upload, int(extras.get("step", -1)))
    if upload is None:
        finish_save(tmp, final, {"step": handle.step}, None, replace=True)
    return handle


def load_sharded(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Collective: verify, then load into the current layout -> this rank's extras."""
    return load_into(Path(path), model, optimizer)


def verify_sharded(path: Path) -> Dict[str, Any]:
    """-> the manifest of a checkpoint whose every file verifies; CheckpointError otherwise."""
    return verify_manifest(Path(path), required=(".metadata",))
