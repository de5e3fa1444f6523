"""Global gradient norm and clipping over parameters that live on different meshes.

`torch.nn.utils.clip_grad_norm_` needs every DTensor on one mesh; with expert parallelism the
expert weights live on the [edp, ep] mesh and the rest on the flattened dp mesh. Here each
gradient contributes the sum of squares of its local shard, summed over the mesh dims it is
sharded on (replicated dims would count it twice), and the per-layout totals are added.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["clip_grad_norm_"]


def _sharded_groups(g: DTensor) -> Tuple:
    mesh = g.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(g.placements) if p.is_shard())


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most `max_norm` (no clipping when
    max_norm <= 0). -> the norm before clipping (fp32 scalar, the same on every rank)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_groups: Dict[Tuple, torch.Tensor] = {}
    for g in grads:
        groups = _sharded_groups(g) if isinstance(g, DTensor) else ()
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = local.detach().float().pow(2).sum()
        by_groups[groups] = by_groups[groups] + sq if groups in by_groups else sq
    total = torch.zeros((), device=grads[0].device)
    for groups, sq in by_groups.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = total + sq
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return norm
