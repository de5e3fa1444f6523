"""Top-k token-choice router (Shazeer et al., 2017; Mixtral's renormalised variant).

Logits and softmax run in fp32 even under autocast: small logit differences decide the routing,
and the z-loss squares logsumexp. The k selected probabilities are renormalised to sum to one,
as Mixtral does, so a token's expert mixture is a convex combination whatever k is.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TopKRouter", "Routing"]


@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] fp32, softmax over all experts
    weights: torch.Tensor  # [N, k] fp32, renormalised top-k probabilities
    experts: torch.Tensor  # [N, k] long, chosen expert per slot


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, hidden] -> Routing."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, weights=weights, experts=experts)
