"""DDP that composes with expert parallelism.

Non-expert weights: torch DDP over all ranks (bucketed all-reduce overlapped with backward).
Expert weights (DTensors from `apply_expert_parallel`) are left out of DDP; each owner's
gradient already sums the ep ranks' contributions (the all-to-all backward), so a hook adds the
replicas that hold the same experts ("edp") and divides by the world size, giving the gradient of
the mean loss over all ranks, as DDP does for the rest. The hook runs on every backward, so
gradient accumulation with `no_sync` still all-reduces expert gradients each micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .mesh import ParallelMesh

__all__ = ["apply_ddp"]


def apply_ddp(model: nn.Module, mesh: ParallelMesh) -> DDP:
    """Wrap a materialised `model` (real weights on its device) -> DDP over `mesh.dp`."""
    experts = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(experts))
    device = next(model.parameters()).device
    wrapped = DDP(model, process_group=mesh.dp.get_group(),
                  device_ids=[device] if device.type == "cuda" else None)
    if experts:
        edp, world = mesh.edp, mesh.dp.size()

        def reduce_expert_grad(param: torch.Tensor) -> None:
            grad = param.grad.to_local()
            if edp.size() > 1:
                dist.all_reduce(grad, group=edp.get_group())
            grad.div_(world)

        for param in experts.values():
            param.register_post_accumulate_grad_hook(reduce_expert_grad)
    return wrapped
