"""FSDP2 (`fully_shard`) applied from outside the model: one unit per block, one at the root.

Each block's weights are gathered just before it runs and (optionally) freed after, so peak
memory holds one block's full weights plus every rank's 1/N shard. With expert parallelism the
experts get their own unit over the "edp" dim (their "ep" split is already in the DTensor),
sharded on dim 1 so the two splits of an expert tensor never compete for dim 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from .expert_parallel import ExpertParallel
from .mesh import ParallelMesh

__all__ = ["apply_fsdp"]


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, param_dtype: torch.dtype = torch.float32,
               reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (an `H64LMForCausalLM`, possibly with `ExpertParallel` experts) over
    `mesh.dp` (from `build_mesh`). Master weights and optimizer state stay fp32;
    `param_dtype` is the gathered compute copy (bf16 on GPU, fp32 on CPU), `reduce_dtype` the
    gradient reduce-scatter dtype. `reshard_after_forward=False` keeps gathered weights from
    forward to backward (ZeRO-2-like: less communication, more memory). -> model (in place)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dp = mesh.dp
    experts = [m for m in model.modules() if isinstance(m, ExpertParallel)]
    if experts:
        edp = mesh.edp
        for module in experts:
            fully_shard(module, mesh=edp, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=lambda _param: Shard(1))
            # Each expert owner already sums its gradient over the ep ranks' tokens (the
            # all-to-all backward); the mean over all dp ranks' losses needs 1 / |dp|, not 1 / |edp|.
            module.set_gradient_divide_factor(float(dp.size()))
    for block in model.layers:
        fully_shard(block, mesh=dp, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # root: embeddings, final norm, LM head (tied or not, they share this unit); the root's
    # weights are needed again first in backward, so it never reshards after forward
    fully_shard(model, mesh=dp, mp_policy=mp, reshard_after_forward=False)
    return model
