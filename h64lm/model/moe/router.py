"""Top-k token-choice router (Shazeer et al., 2017), with the conventions as switches.

Scores s [N, E]: softmax over the experts (Mixtral, Switch) or a sigmoid per expert
(DeepSeek-V3). Gate weights are the k selected scores, renormalised to sum to one when
`normalize` is set (Mixtral at k = 2, DeepSeek-V3), raw otherwise (Switch at k = 1: renormalising
a single weight gives p / p = 1, and the LM loss would then send the router no gradient).

Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437): with `use_bias`, a per-expert bias
b [E] is added to the scores for the top-k SELECTION only; the gate weights use the unbiased scores.
b is a persistent buffer (saved in checkpoints, never seen by the optimizer), moved from outside
after each optimizer step by `h64lm.objectives.balancing.RouterBiasUpdate` (an optimizer post-step hook).

Logits and scores run in fp32 even under autocast: small logit differences decide the routing,
and the z-loss squares logsumexp.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TopKRouter", "Routing"]


@dataclass
class Routing:
    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] fp32, the scores normalised over experts (softmax: the scores)
    weights: torch.Tensor  # [N, k] fp32, gate weights from the unbiased scores
    experts: torch.Tensor  # [N, k] long, chosen expert per slot (biased scores when aux-free)


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score: str = "softmax",
                 normalize: bool = True, use_bias: bool = False):
        super().__init__()
        self.top_k = top_k
        self.score = score
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if use_bias:
            self.register_buffer("bias", torch.zeros(num_experts))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, hidden] -> Routing."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.score == "sigmoid":
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            scores = probs = logits.softmax(dim=-1)
        if self.bias is None:
            top_s, experts = scores.topk(self.top_k, dim=-1)
        else:
            experts = (scores.detach() + self.bias).topk(self.top_k, dim=-1).indices
            top_s = scores.gather(1, experts)
        weights = top_s / top_s.sum(dim=-1, keepdim=True) if self.normalize else top_s
        return Routing(logits=logits, probs=probs, weights=weights, experts=experts)
