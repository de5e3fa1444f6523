"""Router auxiliary losses, per MoE layer, before their coefficients.

Switch load balancing (Fedus et al., 2021): E * sum_i f_i * P_i, with f_i the fraction of the
N*k top-k assignments sent to expert i (all k choices count) and P_i the mean router probability
of expert i. It is 1.0 at perfectly even routing and grows as routing concentrates. Three scopes
for the tokens behind f_i and P_i (`model.router_aux_loss_scope`):
  micro_batch  the micro-batch's N tokens;
  sequence     each sequence on its own, the loss averaged over sequences (DeepSeek-V3's
               complementary sequence-wise loss);
  global       f_i from the counts of the whole optimizer step (all micro-batches, all ranks);
               see `switch_loss_global`.
With the auxiliary-loss-free bias (`model.router_bias_update_rate > 0`), f_i counts the choices
actually made, the top-k of the BIASED scores, in every scope. DeepSeek-V3 (eq. 18) writes its
sequence-wise f_i over the unbiased top-k; we count the realised assignments because f_i is meant
to be the load each expert receives: the bias balances that load, and the loss (whose gradient
flows through P_i only) adds pressure where the realised load is still uneven, rather than a
second controller steering the unbiased argmax towards a target nothing routes by.

Relation to Hugging Face's `load_balancing_loss_func` (Mixtral): it divides the counts by N, not
N*k, so at one layer it is k times ours (k at balance, ours 1); over several layers it pools all
layers' tokens before the product, which equals our per-layer mean only when every layer routes
alike. So our coefficient 0.01 at k=2 weighs the loss as HF's router_aux_loss_coef=0.005 does.
Router z-loss (Zoph et al., 2022): mean over tokens of logsumexp(logits)^2, keeping logits small.
"""

import torch

__all__ = ["switch_load_balancing_loss", "switch_loss_per_sequence", "switch_loss_global",
           "router_z_loss"]


def switch_load_balancing_loss(probs: torch.Tensor, routed_counts: torch.Tensor) -> torch.Tensor:
    """probs [N, E] fp32, routed_counts [E] (assignments per expert, summing to N*k) -> scalar."""
    num_experts = probs.shape[-1]
    f = routed_counts.to(probs.dtype) / routed_counts.sum()
    return num_experts * (f * probs.mean(dim=0)).sum()


def switch_loss_per_sequence(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """probs [B, T, E], experts [B, T, k] chosen ids -> mean over the B sequences of the Switch
    loss of each sequence's T tokens."""
    B, T, num_experts = probs.shape
    counts = probs.new_zeros(B, num_experts).scatter_add_(
        1, experts.reshape(B, -1), probs.new_ones(B, experts[0].numel()))  # [B, E]
    f = counts / experts[0].numel()  # [B, E], each row sums to one
    return num_experts * (f * probs.mean(dim=1)).sum(dim=-1).mean()


def switch_loss_global(probs: torch.Tensor, global_f: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """probs [N, E] of this micro-batch; global_f [E], the assignment fractions of the whole
    optimizer step; scale = M / N_global (M micro-batches over all ranks, N_global tokens).

    Returns E * sum_i f_i * scale * sum_n p_ni. Its mean over the step's M micro-batches (which is
    what averaging the micro-batch losses over accumulation steps and data-parallel ranks takes)
    is E * sum_i f_i * P_i over the global batch, whatever the split, in value and gradient."""
    num_experts = probs.shape[-1]
    return num_experts * scale * (global_f.to(probs.dtype) * probs.sum(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, E] fp32 -> scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()
