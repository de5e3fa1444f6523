"""Expert parallelism: the E experts of every MoE layer split over the `ep` ranks of a group.

`MoELayer` calls `self.experts(x_sorted, counts)` with its rows sorted by expert; this module
swaps that `experts` for `ExpertParallel`, which holds E / ep experts per rank and:
  1. exchanges the per-expert row counts (one all-to-all of E integers),
  2. sends each expert's rows to its owner (`all_to_all_single` with uneven splits),
  3. regroups the received rows (source-major) by local expert and runs the grouped matmul,
  4. sends the results back, so the caller gets rows in its own order.
Routing, capacity and gating stay in `MoELayer` and act on the rank's own tokens only: with a
capacity factor, C = ceil(c * N_local * k / E) counts the rank's local N tokens (one GShard
group per rank), so a rank drops exactly what one process running its batch would drop.

Weights: `gate_up_proj` / `down_proj` keep their names and global shapes [E, ...] as DTensors
sharded Shard(0) over the "ep" mesh dim, so DCP checkpoints reshard across ep degrees and the
state-dict keys equal a plain model's.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from h64lm.model.moe.experts import Experts, swiglu_experts
from h64lm.model.moe.layer import MoELayer

__all__ = ["ExpertParallel", "apply_expert_parallel", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """Rows out by `in_splits`, rows in by `out_splits`; the gradient travels the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits: List[int], in_splits: List[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int],
               group) -> torch.Tensor:
    """Differentiable `all_to_all_single` over rows of x [sum(in_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertParallel(nn.Module):
    """Drop-in for `Experts`: same forward contract, E / ep experts stored per rank."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.ep_mesh = ep_mesh
        self.ep = ep_mesh.size()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.num_local = self.num_experts // self.ep
        first = ep_mesh.get_local_rank() * self.num_local
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)  # [E, a, b], usually still on meta
            local = full.detach().narrow(0, first, self.num_local)
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] rows sorted by (global) expert, counts [E] -> [M, hidden]."""
        group = self.ep_mesh.get_group()
        P, L = self.ep, self.num_local
        # recv_counts[s, l]: rows that source rank s sends to my local expert l
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        recv_counts = recv_counts.view(P, L)
        # one host sync for both count tables: the split sizes must be Python ints
        send, recv = torch.stack((counts.view(P, L).sum(1), recv_counts.sum(1))).tolist()
        x_recv = all_to_all(x, recv, send, group)  # [R, hidden], source-major
        # regroup source-major rows expert-major (stable, so source order is kept per expert)
        local_expert = torch.arange(L, device=x.device).repeat(P)  # [P*L]
        row_expert = local_expert.repeat_interleave(recv_counts.reshape(-1))  # [R]
        order = row_expert.argsort(stable=True)  # [R]
        y_local = swiglu_experts(x_recv.index_select(0, order), _local(self.gate_up_proj),
                                 _local(self.down_proj), recv_counts.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, order, y_local)  # back to source-major
        return all_to_all(y_recv, send, recv, group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> List[ExpertParallel]:
    """Swap the experts of every `MoELayer` in `model` for an `ExpertParallel` over `ep_mesh`
    (call on the meta-device model, before FSDP/DDP). -> the new modules."""
    swapped = []
    for module in model.modules():
        if isinstance(module, MoELayer) and not isinstance(module.experts, ExpertParallel):
            module.experts = ExpertParallel(module.experts, ep_mesh)
            swapped.append(module.experts)
    return swapped
