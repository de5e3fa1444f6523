"""The sparse feed-forward layer: route, dispatch, run experts, combine; plus shared experts.

Shared experts (DeepSeekMoE) see every token. S shared SwiGLU experts of width I are summed, which
is exactly one SwiGLU of width S * I, so they are stored as one.

Capacity: `capacity_factor` in training, `eval_capacity_factor` (default None = dropless) in eval()
mode, so at evaluation and in generation a row's output does not depend on the other rows of its
batch, and cached decoding equals the full forward.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import H64LMConfig
from ..mlp import SwiGLU
from .dispatch import dispatch
from .experts import Experts
from .losses import router_z_loss, switch_load_balancing_loss, switch_loss_global, switch_loss_per_sequence
from .permute import gather_tokens, permute_rows
from .router import TopKRouter

__all__ = ["MoELayer"]


class MoELayer(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.capacity_priority = config.capacity_priority
        self.aux_scope = config.router_aux_loss_scope
        # (global_f [E], scale) for aux scope "global": set by `set_global_balance` each step
        self.global_balance: Optional[Tuple[torch.Tensor, float]] = None
        width = config.expert_intermediate_size
        self.router = TopKRouter(config.hidden_size, config.num_experts, self.top_k,
                                 score=config.router_score, normalize=config.normalize_topk,
                                 use_bias=config.router_bias_update_rate > 0)
        self.experts = Experts(config.num_experts, config.hidden_size, width)
        self.shared = (SwiGLU(config.hidden_size, config.num_shared_experts * width)
                       if config.num_shared_experts else None)

    def set_global_balance(self, counts: Optional[torch.Tensor], total_tokens: int = 0,
                           num_micro_batches: int = 1) -> None:
        """Routed counts [E] of the whole optimizer step (all micro-batches and ranks), its token
        count and its number of micro-batches over all ranks; None clears them."""
        if counts is None:
            self.global_balance = None
            return
        f = counts.detach().float() / counts.sum().clamp(min=1)
        self.global_balance = (f, num_micro_batches / max(total_tokens, 1))

    def _aux_loss(self, routing, routed_counts: torch.Tensor, B: int, T: int) -> torch.Tensor:
        # outside training (evaluation, the counting pass) every scope reports the micro-batch loss
        if self.training and self.aux_scope == "sequence":
            return switch_loss_per_sequence(routing.probs.view(B, T, -1),
                                            routing.experts.view(B, T, -1))
        if self.training and self.aux_scope == "global":
            if self.global_balance is None:
                raise RuntimeError(
                    "model.router_aux_loss_scope=global needs the step's global counts: call "
                    "h64lm.objectives.balancing.prepare_global_balance before the step's forwards")
            f, scale = self.global_balance
            return switch_loss_global(routing.probs, f.to(routing.probs.device), scale)
        return switch_load_balancing_loss(routing.probs, routed_counts)

    def forward(self, x: torch.Tensor, with_stats: bool = True
                ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """x [B, T, hidden] -> (y [B, T, hidden], stats: aux, z, load [E], counts [E] (routed, before
        the capacity cut), dropped; None when `with_stats` is False, as in decoding, where nothing
        reads them)."""
        B, T, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [N, hidden]
        routing = self.router(tokens)
        capacity = self.capacity_factor if self.training else self.eval_capacity_factor
        plan = dispatch(routing.experts, self.num_experts, capacity, self.capacity_priority)
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
            "aux": self._aux_loss(routing, plan.routed_counts, B, T),
            "z": router_z_loss(routing.logits),
            "load": (plan.routed_counts.float() / num_assignments).detach(),
            "counts": plan.routed_counts.detach(),
            "dropped": (plan.num_dropped.float() / num_assignments).detach(),
        }
        return y.view(B, T, hidden), stats
