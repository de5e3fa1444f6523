"""Group token-expert assignments by expert with one sort, optionally enforcing a capacity.

The N*k assignments are ordered by expert (stable, so within an expert earlier tokens come
first); each expert then owns one contiguous slice, and the amount of host-side work does not
depend on how many experts there are. With a capacity factor c each expert keeps at most
C = ceil(c * N * k / E) assignments; the rest are dropped: they add nothing and the residual
stream carries their token unchanged. Which assignments an expert keeps (`priority`):
  token   the earliest tokens in the flattened [B*T] order, any choice (Switch Transformer);
  choice  first choices before second choices, each in token order (GShard's priority), so a
          token loses its best expert only when that expert is full of other first choices.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Dispatch", "dispatch"]


@dataclass
class Dispatch:
    assignment: torch.Tensor  # [M] long, index into the flattened [N*k] assignments, by expert
    token: torch.Tensor  # [M] long, source token of each kept assignment
    counts: torch.Tensor  # [E] long, kept assignments per expert (sums to M)
    routed_counts: torch.Tensor  # [E] long, assignments per expert before the capacity cut
    num_dropped: torch.Tensor  # scalar long
    # [N*k] long, inverse permutation of `assignment`; None with a capacity (nothing to invert)
    inverse: Optional[torch.Tensor] = None


def dispatch(experts: torch.Tensor, num_experts: int, capacity_factor: Optional[float],
             priority: str = "token") -> Dispatch:
    """experts [N, k] chosen expert ids -> the kept assignments sorted by expert."""
    num_tokens, top_k = experts.shape
    flat = experts.reshape(-1)  # [N*k], assignment a = n * k + j
    if capacity_factor is not None and priority == "choice":
        # sort the choice-major order (position j * N + n), then map back to a = n * k + j
        sorted_expert, position = experts.t().reshape(-1).sort(stable=True)
        assignment = (position % num_tokens) * top_k + position // num_tokens
    else:
        sorted_expert, assignment = flat.sort(stable=True)
    routed_counts = torch.bincount(flat, minlength=num_experts)
    counts = routed_counts
    inverse = None
    if capacity_factor is None:
        positions = torch.arange(flat.numel(), device=flat.device)
        inverse = torch.empty_like(assignment).scatter_(0, assignment, positions)
    else:
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
        first_of_expert = routed_counts.cumsum(0) - routed_counts  # [E]
        rank = torch.arange(flat.numel(), device=flat.device) - first_of_expert[sorted_expert]
        assignment = assignment[rank < capacity]
        counts = routed_counts.clamp(max=capacity)
    return Dispatch(
        assignment=assignment,
        token=assignment // top_k,
        counts=counts,
        routed_counts=routed_counts,
        num_dropped=routed_counts.sum() - counts.sum(),
        inverse=inverse,
    )
