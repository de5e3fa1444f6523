"""Router auxiliary losses, per MoE layer, before their coefficients.

Switch load balancing (Fedus et al., 2021): E * sum_i f_i * P_i, with f_i the fraction of the
N*k top-k assignments sent to expert i (all k choices count) and P_i the mean router probability
of expert i. It is 1.0 at perfectly even routing and grows as routing concentrates.
Router z-loss (Zoph et al., 2022): mean over tokens of logsumexp(logits)^2, keeping logits small.
"""

import torch

__all__ = ["switch_load_balancing_loss", "router_z_loss"]


def switch_load_balancing_loss(probs: torch.Tensor, routed_counts: torch.Tensor) -> torch.Tensor:
    """probs [N, E] fp32, routed_counts [E] (assignments per expert, summing to N*k) -> scalar."""
    num_experts = probs.shape[-1]
    f = routed_counts.to(probs.dtype) / routed_counts.sum()
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, E] fp32 -> scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()
