"""The sparse feed-forward layer: route, dispatch, run experts, combine; plus shared experts.

Shared experts (DeepSeekMoE) see every token. S shared SwiGLU experts of width I are summed, which
is exactly one SwiGLU of width S * I, so they are stored as one.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import H64LMConfig
from ..mlp import SwiGLU
from .dispatch import dispatch
from .experts import Experts
from .losses import router_z_loss, switch_load_balancing_loss
from .permute import gather_tokens, permute_rows
from .router import TopKRouter

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.capacity_factor = config.capacity_factor
        width = config.expert_intermediate_size
        self.router = TopKRouter(config.hidden_size, config.num_experts, self.top_k)
        self.experts = Experts(config.num_experts, config.hidden_size, width)
        self.shared = (SwiGLU(config.hidden_size, config.num_shared_experts * width)
                       if config.num_shared_experts else None)

    def forward(self, x: torch.Tensor, with_stats: bool = True
                ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """x [B, T, hidden] -> (y [B, T, hidden], stats: aux, z, load [E], dropped; None when
        `with_stats` is False, as in decoding, where nothing reads them)."""
        B, T, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [N, hidden]
        routing = self.router(tokens)
        plan = dispatch(routing.experts, self.num_experts, self.capacity_factor)
        gate = routing.weights.reshape(-1)[plan.assignment].to(x.dtype)  # [M]
        num_assignments = routing.experts.numel()
        if plan.inverse is not None:  # dropless: M = N*k, gathers both ways
            x_sorted = gather_tokens(tokens, plan.token, plan.inverse, self.top_k)
            y_sorted = self.experts(x_sorted, plan.counts) * gate[:, None]  # [N*k, hidden]
            per_assignment = permute_rows(y_sorted, plan.inverse, plan.assignment)
        else:
            x_sorted = tokens.index_select(0, plan.token)  # [M, hidden]
            y_sorted = self.experts(x_sorted, plan.counts) * gate[:, None]  # [M, hidden]
            per_assignment = tokens.new_zeros(num_assignments, hidden).index_copy(
                0, plan.assignment, y_sorted)  # zero rows where dropped
        y = per_assignment.view(-1, self.top_k, hidden).sum(dim=1)  # [N*k, hidden] -> [N, hidden]
        if self.shared is not None:
            y = y + self.shared(tokens)
        if not with_stats:
            return y.view(B, T, hidden), None
        stats = {
            "aux": switch_load_balancing_loss(routing.probs, plan.routed_counts),
            "z": router_z_loss(routing.logits),
            "load": (plan.routed_counts.float() / num_assignments).detach(),
            "dropped": (plan.num_dropped.float() / num_assignments).detach(),
        }
        return y.view(B, T, hidden), stats
