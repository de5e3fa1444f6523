"""One call from a model factory to a parallel model on its device, in the required order:
meta construction -> expert parallelism -> FSDP -> materialise -> DDP."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .ddp import apply_ddp
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp
from .init import materialize
from .layout import STRATEGIES, ParallelLayout
from .mesh import ParallelMesh

__all__ = ["STRATEGIES", "build_parallel_model"]


def build_parallel_model(build: Callable[[], nn.Module], layout: ParallelLayout, mesh: Optional[ParallelMesh],
                         seed: int, device: torch.device,
                         param_dtype: torch.dtype = torch.float32,
                         reduce_dtype: torch.dtype = torch.float32,
                         reshard_after_forward: bool = True,
                         prepare: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """`build()` makes the (unwrapped) model; `mesh` None = one process (a plain model on
    `device`), else `build_mesh(layout)`. The weights equal `torch.manual_seed(seed); build()`
    then `prepare(model)` (e.g. initialisation from another checkpoint, applied to the full model
    before it is split) in every layout. `param_dtype`/`reduce_dtype`/`reshard_after_forward`
    apply to fsdp only (ddp keeps using autocast for bf16). -> DDP(model) under ddp with several
    processes, else the model itself."""
    with torch.device("meta"):
        model = build()
    if mesh is not None and layout.ep > 1:
        apply_expert_parallel(model, mesh.ep)
    if mesh is not None and layout.strategy == "fsdp":
        apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    materialize(model, build, seed, device, prepare)
    if mesh is not None and layout.strategy == "ddp":
        model = apply_ddp(model, mesh)  # DDP checks and broadcasts real weights
    return model
