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
from .mesh import ParallelMesh

__all__ = ["STRATEGIES", "build_parallel_model"]

STRATEGIES = ("ddp", "fsdp")


def build_parallel_model(build: Callable[[], nn.Module], mesh: Optional[ParallelMesh],
                         strategy: str, seed: int, device: torch.device,
                         param_dtype: torch.dtype = torch.float32,
                         reduce_dtype: torch.dtype = torch.float32,
                         reshard_after_forward: bool = True) -> nn.Module:
    """`build()` makes the (unwrapped) model; mesh None = one process, plain model. The weights
    equal `torch.manual_seed(seed); build()` in every layout. `param_dtype`/`reduce_dtype`/
    `reshard_after_forward` apply to fsdp only (ddp keeps using autocast for bf16)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"hardware.strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    with torch.device("meta"):
        model = build()
    if mesh is not None and mesh.ep.size() > 1:
        apply_expert_parallel(model, mesh.ep)
    if mesh is not None and strategy == "fsdp":
        apply_fsdp(model, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    materialize(model, build, seed, device)
    if mesh is not None and strategy == "ddp":
        model = apply_ddp(model, mesh)  # DDP checks and broadcasts real weights
    return model
