"""Pairwise preference losses: the Bradley-Terry reward-model loss and DPO / IPO.

Every function takes per-pair quantities [P] (P = number of (chosen, rejected) pairs) that the
caller computed: rewards from a reward model's scalar head, or sequence log-probabilities of the
chosen and rejected answers under the policy and the frozen reference (`sequence_logprobs`).

DPO (Rafailov et al. 2023), with h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):
  sigmoid  -log sigma(beta h); with label smoothing eps (the "conservative DPO" of Mitchell 2023,
           preferences flipped with probability eps) -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
  ipo      (h - 1 / (2 beta))^2, IPO's objective (Azar et al. 2023, eq. 17, with tau = beta): h is
           regressed onto a fixed margin instead of being pushed to infinity.
Normalisation: the sigmoid loss reads summed log-probs (the sequence log-likelihood, as the paper);
ipo reads per-token averaged log-probs, as TRL does, because a fixed target margin 1/(2 beta) only
means the same thing for answers of different lengths once h is per token. `DPO_REDUCTION` says
which `sequence_logprobs` reduction each variant expects.

Metrics carry TRL's names and definitions (detached, means over the pairs): the implicit reward of
an answer is beta (log pi - log ref); `rewards/margins` is chosen - rejected, `rewards/accuracies`
the share of pairs whose chosen reward is strictly higher, `logps/*` the policy log-probs fed in.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSSES", "DPO_REDUCTION", "bradley_terry_loss", "dpo_loss"]

DPO_LOSSES = ("sigmoid", "ipo")
DPO_REDUCTION = {"sigmoid": "sum", "ipo": "mean"}


def bradley_terry_loss(chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Reward-model loss: mean over pairs of -log sigma(r_c - r_r), the negative log-likelihood of
    the observed preference under Bradley-Terry. r_c, r_r [P] -> (loss, metrics)."""
    margin = chosen_rewards.float() - rejected_rewards.float()  # [P]
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "rewards/chosen": chosen_rewards.detach().float().mean().item(),
        "rewards/rejected": rejected_rewards.detach().float().mean().item(),
        "rewards/margins": margin.detach().mean().item(),
        "rewards/accuracies": (margin.detach() > 0).float().mean().item(),
    }
    return loss, metrics


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Sequence log-probs [P] of the chosen / rejected answers under the policy and the reference
    (reduced as `DPO_REDUCTION[loss_type]`) -> (mean loss over pairs, TRL-named metrics)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to loss_type=sigmoid only")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()  # [P] log pi/ref of y_c
    rejected_ratio = policy_rejected.float() - ref_rejected.float()  # [P]
    h = chosen_ratio - rejected_ratio  # [P]
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_reward.mean().item(),
        "rewards/rejected": rejected_reward.mean().item(),
        "rewards/margins": (chosen_reward - rejected_reward).mean().item(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean().item(),
        "logps/chosen": policy_chosen.detach().float().mean().item(),
        "logps/rejected": policy_rejected.detach().float().mean().item(),
    }
    return losses.mean(), metrics
