"""Model weights on their own: loading a state dict into a model, and `best_model.safetensors`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .errors import CheckpointError

__all__ = ["load_model_state", "save_consolidated", "consolidated_state_dict"]


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes: `module.` (DDP/DataParallel) and `_orig_mod.` (torch.compile)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     strict: bool = True) -> tuple[list[str], list[str]]:
    """Load weights into a plain `model` -> (missing, unexpected) keys; with `strict`, any of
    either is an error listing them (otherwise the caller reports a partial load)."""
    result = model.load_state_dict(_strip_prefixes(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return missing, unexpected


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) model state dict in rank 0's host memory; {} elsewhere."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_consolidated(model: nn.Module, path: Path) -> None:
    """Collective: rank 0 writes the full weights as safetensors, a tied tensor once under its
    first name (loadable with safetensors' `load_model` on a plain model), atomically."""
    full = consolidated_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    module = model.module if hasattr(model, "module") else model  # a DDP wrapper
    params = dict(module.named_parameters(remove_duplicate=False))
    first_name = {id(p): n for n, p in reversed(params.items())}
    keep: dict[str, torch.Tensor] = {}
    for key, value in full.items():  # DCP may list a tied tensor under either of its names
        keep.setdefault(first_name[id(params[key])] if key in params else key, value.contiguous())
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(keep, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; the other outputs are 0644
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
