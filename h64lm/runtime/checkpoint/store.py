"""One checkpoint directory, written and read with torch.distributed.checkpoint (DCP).

  .metadata          DCP's index (which file holds which slice of each global tensor)
  __R_I.distcp       rank R's shards of the model and optimizer state
  extras/rank_R.pt   rank R's plain data (step, loader position, RNG states, ...), weights_only
  manifest.json      size + SHA-256 of each file above, written last by rank 0
Keys are layout-free (`get_state_dict` names optimizer state by parameter FQN and strips
wrappers), so a checkpoint written at one world size / strategy / ep degree loads into another.
Every step is agreed on by all ranks (`_agree`): an error on one rank (a full disk) becomes the
same CheckpointError on every rank instead of a hang in the next collective.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.tensor import DTensor

from h64lm.config import run_config_from_yaml
from h64lm.model import H64LMForCausalLM
from h64lm.optim.optimizer import build_optimizer

from .errors import CheckpointError, os_error_line
from .layout import fsync_dir, remove_stale_temporaries
from .legacy import is_legacy_file, load_legacy_file, load_plain
from .manifest import file_digest, write_manifest
from .safe_load import SafeFullLoadPlanner, SafeLoadPlanner, SafeReader, load_metadata
from .trust import METADATA, verify

__all__ = ["load_trained_model", "state_of", "begin_save", "write_shards", "local_digests", "finish_save", "read_extras",
           "load_into", "read_full_state"]

Group = Optional[dist.ProcessGroup]


# DCP warns at every call without a process group that it assumes one process: that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _agree(error: str | None, group: Group) -> None:
    """Raise the first rank's error on every rank (collective on `group`)."""
    errors = [error]
    if _dist():
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def state_of(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def begin_save(tmp: Path, extras: dict[str, Any], group: Group) -> None:
    """Collective: rank 0 makes `tmp/extras/` (removing a killed save's leftovers), then every rank
    writes its extras."""
    error = None
    if _rank() == 0:
        try:
            remove_stale_temporaries(tmp.parent)
            (tmp / "extras").mkdir(parents=True)
        except OSError as e:
            error = os_error_line("save checkpoint", tmp, e)
    _agree(error, group)
    try:
        torch.save(extras, tmp / "extras" / f"rank_{_rank()}.pt")
    except OSError as e:
        error = os_error_line("save checkpoint", tmp, e)
    _agree(error, group)


def _dcp_os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind DCP's CheckpointException (which collects every rank's failure)."""
    if isinstance(e, OSError):
        return e
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        while inner is not None and not isinstance(inner, OSError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            return inner
    return None


def write_shards(state: dict[str, Any], tmp: Path, group: Group, background: bool):
    """Collective: the shards into `tmp`. With `background`, returns DCP's future once the state
    is staged in host memory; its collectives run on `group` only, never the training's."""
    try:
        if background:
            return dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
        dcp.save(state, checkpoint_id=str(tmp), process_group=group, no_dist=not _dist())
    except (CheckpointException, OSError) as e:
        raise shard_error(e, tmp) from None
    return None


def shard_error(e: BaseException, tmp: Path) -> CheckpointError:
    cause = _dcp_os_error(e)
    if cause is not None:
        return CheckpointError(os_error_line("save checkpoint", tmp, cause))
    return CheckpointError(f"could not save checkpoint {tmp}: {str(e).splitlines()[0][:200]}")


def local_digests(tmp: Path) -> dict[str, dict[str, Any]]:
    """Digests of the files this rank wrote (rank 0: also DCP's `.metadata`)."""
    rank = _rank()
    names = [p.name for p in tmp.glob(f"__{rank}_*.distcp")] + [f"extras/rank_{rank}.pt"]
    if rank == 0:
        names.append(METADATA)
    return {n: file_digest(tmp / n) for n in names}


def finish_save(tmp: Path, final: Path, info: dict[str, Any], group: Group, replace: bool) -> None:
    """Collective: gather every rank's digests; rank 0 writes the manifest (hashing any file no rank
    claimed) and renames `tmp` to `final`. An existing `final` that verifies is kept unless
    `replace` (a re-save of the same step holds the same state)."""
    error, digests = None, {}
    try:
        digests = local_digests(tmp)
    except OSError as e:
        error = os_error_line("hash checkpoint file in", tmp, e)
    _agree(error, group)
    gathered = [digests]
    if _dist():
        gathered = [None] * dist.get_world_size(group) if _rank() == 0 else None
        dist.gather_object(digests, gathered, dst=0, group=group)
    if _rank() == 0:
        try:
            files = {k: v for d in gathered for k, v in d.items()}
            for p in tmp.rglob("*"):
                name = str(p.relative_to(tmp))
                if p.is_file() and name not in files:
                    files[name] = file_digest(p)
            world = dist.get_world_size() if _dist() else 1
            write_manifest(tmp, files, {**info, "world_size": world})
            fsync_dir(tmp)
            _rename_into_place(tmp, final, replace)
        except OSError as e:
            error = os_error_line("save checkpoint", tmp, e)
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(error, group)


def _rename_into_place(tmp: Path, final: Path, replace: bool) -> None:
    if final.exists() or final.is_symlink():
        keep = False
        if not replace:
            try:
                verify(final)
                keep = True
            except (CheckpointError, OSError):
                pass
        if keep:
            shutil.rmtree(tmp)
            return
        old = final.with_name(f".{final.name}.old.tmp")
        os.replace(final, old)  # out of the way first: `final` is never half-deleted
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def read_extras(path: Path, rank: int = 0) -> dict[str, Any]:
    """A verified checkpoint's plain data: rank `rank`'s (rank 0's when it had fewer ranks)."""
    path = Path(path)
    if is_legacy_file(path):
        return {k: v for k, v in load_legacy_file(path).items() if k not in ("model", "optimizer")}
    own = path / "extras" / f"rank_{rank}.pt"
    source = own if own.exists() else path / "extras" / "rank_0.pt"
    extras = load_plain(source)
    if not isinstance(extras, dict) or "step" not in extras:
        raise CheckpointError(f"{source} is not a checkpoint's extras (a dict with `step`)")
    return extras


def _load_legacy_into(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    from .weights import load_model_state

    state = load_legacy_file(path)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        load_model_state(model, state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return
    # A sharded model: a plain CPU copy names the file's optimizer state (indexed by position) by
    # parameter, then each rank keeps its slices of the full tensors.
    saved = run_config_from_yaml(state["config"])
    plain = H64LMForCausalLM(saved.model)
    load_model_state(plain, state["model"])
    plain_opt = build_optimizer(plain, saved.optim, torch.device("cpu"))
    plain_opt.load_state_dict(state["optimizer"])
    model_sd, optim_sd = get_state_dict(plain, plain_opt)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {},
                   options=StateDictOptions(full_state_dict=True))


def _check_metadata(path: Path) -> None:
    """Unpickle `.metadata` through the allowlist first: a refusal is one line here, where inside
    DCP it would be wrapped in a per-rank exception report."""
    load_metadata((path / METADATA).read_bytes(), str(path / METADATA))


def load_into(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
              group: Group = None) -> dict[str, Any]:
    """Collective: verify, then load the model (+ optimizer) state into whatever layout `model`
    has -> this rank's extras."""
    path = Path(path)
    verify(path)
    if is_legacy_file(path):
        _load_legacy_into(path, model, optimizer)
        return read_extras(path)
    _check_metadata(path)
    state = state_of(model, optimizer)
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(),
                 process_group=group, no_dist=not _dist())
    except CheckpointException as e:
        raise CheckpointError(f"{path} cannot be loaded into this model: {str(e).splitlines()[0][:200]}") from None
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    return read_extras(path, _rank())


def read_full_state(path: Path) -> dict[str, Any]:
    """A verified checkpoint as one dict in this process: rank 0's extras, `model` (full tensors by
    name) and `optim` (DCP's flattened names) for new directories, `optimizer` for legacy files."""
    path = Path(path)
    verify(path)
    if is_legacy_file(path):
        return load_legacy_file(path)
    _check_metadata(path)
    state: dict[str, Any] = {}
    # dcp.load copies the top-level dict; the lower-level call fills this one (as DCP's own
    # dcp_to_torch_save does)
    _load_state_dict(state, storage_reader=SafeReader(str(path)), planner=SafeFullLoadPlanner(), no_dist=True)
    return {**read_extras(path), **state}


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[H64LMForCausalLM, Any]:
    """(model in eval mode, the RunConfig it was trained with) from a verified checkpoint (any
    layout and world size: its weights are gathered into this plain model) or a run directory's
    newest that verifies."""
    from .trust import resolve

    path = resolve(checkpoint)
    saved = run_config_from_yaml(read_extras(path)["config"])
    model = H64LMForCausalLM(saved.model)
    load_into(path, model)
    return model.to(device).eval(), saved
