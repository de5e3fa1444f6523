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

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .layout import ParallelLayout

__all__ = ["ParallelMesh", "build_mesh"]


@dataclass(frozen=True)
class ParallelMesh:
    root: DeviceMesh  # [edp, ep]
    dp: DeviceMesh  # all ranks (root flattened), for non-expert weights
    ep: DeviceMesh  # the ranks splitting the experts
    edp: DeviceMesh  # the ranks holding the same experts


def build_mesh(layout: ParallelLayout, device_type: str) -> ParallelMesh:
    """-> the [edp, ep] mesh of a (validated) layout and its three views; unused dims have
    size 1. Needs an initialised process group of `layout.world_size` ranks (gloo or nccl)."""
    root = init_device_mesh(device_type, (layout.edp, layout.ep), mesh_dim_names=("edp", "ep"))
    # the flattened view is kept here: slicing it back out of the root is deprecated
    return ParallelMesh(root=root, dp=root._flatten("dp"), ep=root["ep"], edp=root["edp"])
