"""Meta-device construction, then each rank materialises only its shard.

Every layout (1 process, FSDP, EP, DDP) starts from the same weights: rank 0 builds the
reference model on CPU after `torch.manual_seed(seed)` (exactly what a one-process run does) and
`set_model_state_dict(broadcast_from_rank0=True)` scatters each parameter's slices to their
owners, shard by shard. Only rank 0 ever holds a full copy, and only on the host.
Tied weights (a tied LM head) are tied again after `to_empty`, which would split them.
Non-persistent buffers (RoPE tables, ALiBi slopes) are no state-dict entries: they are
broadcast separately (they are small) and copied in.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

__all__ = ["materialize"]


def _non_persistent_buffers(model: nn.Module) -> dict:
    persistent = set(model.state_dict().keys())
    return {k: b for k, b in model.named_buffers() if k not in persistent}


def _tied_names(model: nn.Module) -> list:
    """-> (first name, other name) for every parameter reachable under two names."""
    first, ties = {}, []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties.append((first[id(param)], name))
        else:
            first[id(param)] = name
    return ties


def materialize(model: nn.Module, build: Callable[[], nn.Module], seed: int,
                device: torch.device, prepare: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """`model`: built under `torch.device("meta")` and already parallelised. `build()` makes the
    same model for real on CPU (rank 0 calls it once, after `torch.manual_seed(seed)`; the global
    RNG is restored afterwards), then `prepare(reference)` when given (e.g. weights from another
    checkpoint, applied to the full model). -> model, with real weights on `device` (in place)."""
    ties = _tied_names(model)
    model.to_empty(device=device)  # gives each name its own new tensor: tie them again
    for first, other in ties:
        owner, _, attr = other.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, model.get_parameter(first))
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    full, buffers = {}, {}
    if not distributed or dist.get_rank() == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reference = build()
        if prepare is not None:
            prepare(reference)
        full, buffers = reference.state_dict(), _non_persistent_buffers(reference)
    if distributed:
        box = [{k: b.cpu() for k, b in buffers.items()}]
        dist.broadcast_object_list(box, src=0)
        buffers = box[0]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(model, full, options=options)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                setattr(module, attr, buffers[name].to(device))
    return model
