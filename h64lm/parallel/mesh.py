"""The device mesh: who holds which weights.

Ranks form a 2-D grid [world / ep, ep] with dims ("edp", "ep"); rank r sits at
(r // ep, r % ep), so an expert-parallel group is `ep` consecutive ranks (one node's fast
links when ep <= GPUs per node). Three views of it are used:
  dp  = edp x ep flattened: all ranks; non-expert weights are data-parallel over it;
  ep  : the ranks that split the experts between them (disjoint experts, tokens by all-to-all);
  edp : the ranks holding the same experts; expert weights are data-parallel over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelMesh", "build_mesh", "check_layout"]


def check_layout(world_size: int, ep: int, num_experts: Optional[int] = None) -> None:
    """One-line errors, before any process group work, for an `ep` that cannot split the run."""
    if ep < 1:
        raise ValueError(f"hardware.ep={ep} must be >= 1")
    if world_size % ep:
        raise ValueError(f"hardware.ep={ep} must divide the world size {world_size}; "
                         "change hardware.ep or the number of processes")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"hardware.ep={ep} must divide model.num_experts={num_experts}; "
                         "change hardware.ep or model.num_experts")


@dataclass(frozen=True)
class ParallelMesh:
    root: DeviceMesh  # [edp, ep]
    dp: DeviceMesh  # all ranks (root flattened), for non-expert weights
    ep: DeviceMesh  # the ranks splitting the experts
    edp: DeviceMesh  # the ranks holding the same experts


def build_mesh(world_size: int, ep: int, device_type: str,
               num_experts: Optional[int] = None) -> ParallelMesh:
    """-> the [edp, ep] mesh and its three views. Needs an initialised process group of
    `world_size` ranks (gloo or nccl); `num_experts` (when given) is checked against `ep`."""
    check_layout(world_size, ep, num_experts)
    root = init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("edp", "ep"))
    # the flattened view is kept here: slicing it back out of the root is deprecated
    return ParallelMesh(root=root, dp=root._flatten("dp"), ep=root["ep"], edp=root["edp"])
