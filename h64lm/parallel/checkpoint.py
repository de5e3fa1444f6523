"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards.

A checkpoint is a directory written as `.NAME.tmp` and renamed to `NAME` once complete:
  .metadata        DCP's index: each tensor's global shape and which file holds which slice
  __R_0.distcp     rank R's shards of model and optimizer state
  extras/rank_R.pt plain data of rank R (step, loader position, RNG states, ...)
  .complete        JSON marker: SHA-256 of .metadata, world size; absent = incomplete
State-dict keys are layout-free (`get_state_dict` strips FSDP/DDP wrappers and names optimizer
state by parameter FQN), so a checkpoint saved at one world size / strategy / ep degree loads
into another: DCP reads each rank's slices of the global tensors it now owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

__all__ = ["ShardedCheckpointError", "SaveHandle", "save_sharded", "load_sharded",
           "verify_sharded", "consolidated_state_dict", "save_consolidated"]

MARKER = ".complete"


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint that is incomplete or corrupt; the message names the directory."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


class SaveHandle:
    """A save in flight. `wait()` (on every rank) blocks until the shards are on disk, then
    rank 0 writes the marker and renames the directory into place."""

    def __init__(self, tmp: Path, final: Path, future: Optional[Future]):
        self.tmp, self.final, self.future, self.done = tmp, final, future, False

    def wait(self) -> Path:
        if not self.done:
            if self.future is not None:
                self.future.result()
            if _rank() == 0:
                _finalize(self.tmp, self.final)
            _barrier()  # nobody reads `final` before it exists
            self.done = True
        return self.final


def _finalize(tmp: Path, final: Path) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    marker = {"metadata_sha256": _sha256(tmp / ".metadata"), "world_size": world}
    with open(tmp / MARKER, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same name: the old copy goes only now
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 extras: Optional[Dict[str, Any]] = None, async_save: bool = False) -> SaveHandle:
    """Collective: every rank calls it. `extras`: this rank's plain data (tensors, numbers,
    strings, lists/dicts of them). With `async_save` the state is staged to host memory and
    written in the background: training may continue, and `handle.wait()` must be called on
    every rank before the next save and before exit. Without it, the checkpoint is complete and
    in place on return."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        if tmp.exists():  # left by a save that crashed
            shutil.rmtree(tmp)
        (tmp / "extras").mkdir(parents=True)
    _barrier()
    torch.save(extras or {}, tmp / "extras" / f"rank_{_rank()}.pt")
    state = _state(model, optimizer)
    if async_save and dist.is_initialized():
        future = dcp.async_save(state, checkpoint_id=str(tmp))
        return SaveHandle(tmp, final, future)
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    handle = SaveHandle(tmp, final, None)
    handle.wait()
    return handle


def verify_sharded(path: Path) -> Dict[str, Any]:
    """-> the marker of a complete checkpoint; ShardedCheckpointError otherwise."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise ShardedCheckpointError(f"{path} has no {MARKER} marker: the save did not finish; "
                                     "resume from an older checkpoint")
    info = json.loads(marker.read_text())
    if _sha256(path / ".metadata") != info["metadata_sha256"]:
        raise ShardedCheckpointError(f"{path}/.metadata does not match its checksum in {MARKER}: "
                                     "the checkpoint is corrupt; resume from an older one")
    return info


def load_sharded(path: Path, model: nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Collective: load model (+ optimizer) state into the current layout, whatever layout saved
    it. -> this rank's extras (rank 0's when the checkpoint had fewer ranks)."""
    path = Path(path)
    verify_sharded(path)
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    own = path / "extras" / f"rank_{_rank()}.pt"
    return torch.load(own if own.exists() else path / "extras" / "rank_0.pt", weights_only=True)


def consolidated_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Collective: the full (unsharded) model state dict on rank 0's host memory; {} elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_consolidated(model: nn.Module, path: Path) -> None:
    """Collective: rank 0 writes the full weights as safetensors (tied weights stored once, as
    `h64lm.train.checkpoint.save_weights` does), loadable with `load_weights` on a plain model."""
    full = consolidated_state_dict(model)
    if _rank() != 0:
        return
    module = model.module if hasattr(model, "module") else model  # a DDP wrapper
    params = dict(module.named_parameters(remove_duplicate=False))
    first_name = {id(p): n for n, p in reversed(params.items())}  # a tied tensor's first name
    keep: Dict[str, torch.Tensor] = {}
    for key, value in full.items():  # DCP may list a tied tensor under either of its names
        keep.setdefault(first_name[id(params[key])] if key in params else key, value.contiguous())
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(keep, str(tmp))
    os.replace(tmp, path)
