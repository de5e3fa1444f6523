"""Policy-gradient math for GRPO and PPO over sampled completions.

Shapes: N prompts, G completions per prompt, B = N * G completion rows, T completion tokens
(right-padded), `mask` [B, T] bool (True = a sampled token that counts). Log-probs are per token
[B, T] (`token_logprobs`): `logp` under the policy being trained, `old_logp` under the policy that
sampled (detached), `ref_logp` under the frozen reference.

GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): advantages are the rewards normalised within each
prompt's group; the loss is PPO's clipped surrogate plus beta * KL(pi || ref) estimated per token
with k3 (Schulman 2020, unbiased and >= 0): exp(ref - logp) - (ref - logp) - 1.
PPO (Schulman et al. 2017) with a value head: per-token advantages from GAE (Schulman et al. 2016),
optionally whitened over the step's tokens (`whiten`, as standard PPO implementations do), and a
clipped value loss.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["AGGREGATIONS", "ADVANTAGE_SCALES", "completion_mask", "group_advantages", "k3_kl",
           "clipped_policy_loss", "terminal_rewards", "gae", "clipped_value_loss", "whiten"]

AGGREGATIONS = ("sequence", "token")
ADVANTAGE_SCALES = ("std", "none")


def completion_mask(completions: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    """completions [B, n] (the generated columns of `generate`) -> mask [B, n] bool: every token
    up to and including the row's first EOS (the EOS is a sampled action too); the pads after it
    are not. Without an EOS id every token counts."""
    if eos_token_id is None:
        return torch.ones_like(completions, dtype=torch.bool)
    is_eos = (completions == eos_token_id).long()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return before == 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [B] (B = N * G, each prompt's G completions adjacent) -> advantages [B].

    scale="std": (r - mean_group) / (std_group + eps), GRPO's outcome supervision. std is the
    SAMPLE standard deviation (Bessel's n - 1), as TRL and OpenRLHF compute it, so advantages and
    curves compare with theirs; it needs G >= 2. A group whose rewards are all equal gets 0.
    scale="none": r - mean_group only, Dr. GRPO (Liu et al. 2025): dividing by the std up-weights
    groups that are almost all right or all wrong, a difficulty bias.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {', '.join(ADVANTAGE_SCALES)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of group_size={group_size} "
                         "(G >= 2 completions per prompt, adjacent)")
    grouped = rewards.float().view(-1, group_size)  # [N, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from tokens sampled by pi: with d = ref - logp,
    exp(d) - d - 1 (>= 0, exactly 0 where pi == ref). [B, T] -> [B, T]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """[B, T] -> scalar. "sequence": mean over each row's tokens, then over rows (GRPO paper's
    1/G sum_i 1/|o_i| sum_t); "token": one mean over every counted token in the batch (DAPO), so
    long completions weigh in proportion to their length."""
    m = mask.to(per_token.dtype)
    if aggregation == "token":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None, kl_beta: float = 0.0, aggregation: str = "sequence",
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """PPO's clipped surrogate, minimised: per token
    -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + kl_beta * k3, rho = exp(logp - old_logp).
    advantages [B] (one per completion, GRPO) or [B, T] (per token, PPO/GAE).
    -> (loss, metrics): `clip_ratio` is the share of counted tokens whose gradient the clip
    removes (rho > 1 + eps_high with A > 0, or rho < 1 - eps with A < 0); `kl` the mean k3."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    ratio = torch.exp(logp - old_logp.detach())  # [B, T]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    per_token = -surrogate
    metrics: Dict[str, float] = {}
    counted = mask.bool()
    n = counted.sum().clamp(min=1)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp.detach())
        if kl_beta:
            per_token = per_token + kl_beta * kl
        metrics["kl"] = ((kl.detach() * counted).sum() / n).item()
    clipped = ((ratio > 1 + high) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    metrics["clip_ratio"] = ((clipped & counted).sum() / n).item()
    return _aggregate(per_token, mask, aggregation), metrics


def terminal_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One score per completion [B] -> per-token rewards [B, T]: the score on each row's last
    counted token, 0 elsewhere (a row with no counted token gets nothing)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # [B]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = last >= 0
    out[rows, last[rows]] = scores[rows].float()
    return out


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's counted tokens. rewards, values, mask
    [B, T] -> (advantages, returns) [B, T], 0 where not counted.

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the row's
    NEXT COUNTED token (not t + 1: uncounted tokens inside a row, e.g. tool output, are skipped)
    and V, A after the last counted token are 0 (the episode ends there). Returns = A + V, the
    value head's target."""
    m = mask.bool()
    next_value = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)  # [B]
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        v = values[:, t].float()
        delta = rewards[:, t].float() + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        here = m[:, t]
        advantages[:, t] = torch.where(here, adv, 0.0)
        next_adv = torch.where(here, adv, next_adv)
        next_value = torch.where(here, v, next_value)
    returns = torch.where(m, advantages + values.float(), 0.0)
    return advantages, returns


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, *, clip_eps: float = 0.2,
                       aggregation: str = "token") -> torch.Tensor:
    """PPO's value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), so one
    update cannot move a value estimate more than eps from the one it sampled with. [B, T] each."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    old = old_values.detach().float()
    clipped = old + (values.float() - old).clamp(-clip_eps, clip_eps)
    per_token = 0.5 * torch.maximum((values.float() - returns) ** 2, (clipped - returns) ** 2)
    return _aggregate(per_token, mask, aggregation)


@torch.no_grad()
def whiten(advantages: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
           sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
           eps: float = 1e-8) -> List[torch.Tensor]:
    """PPO's advantage whitening over ONE optimizer step: advantages [B, T] of each micro-batch with
    their masks [B, T] -> (A - mu) / sqrt(sigma^2 + eps) on the counted tokens, 0 elsewhere, where
    mu and sigma^2 are the mean and the population variance (1/n) of every counted token of every
    micro-batch, and of every rank through `sum_over_ranks` (an in-place all-reduce): each rank
    whitens with the same statistics, so a step split over ranks equals one process's. Two passes
    (mean, then squared deviations) in float64, so no large sums cancel."""
    m = [mask.bool() for mask in masks]
    n_and_sum = sum_over_ranks(torch.stack([
        sum(x.sum() for x in m).double(), sum(a.double()[x].sum() for a, x in zip(advantages, m))]))
    n = n_and_sum[0].clamp(min=1)
    mean = n_and_sum[1] / n
    squares = sum_over_ranks(sum(((a.double() - mean)[x] ** 2).sum() for a, x in zip(advantages, m)).reshape(1))
    scale = torch.rsqrt(squares[0] / n + eps)
    return [torch.where(x, (a.double() - mean) * scale, 0.0).to(a.dtype) for a, x in zip(advantages, m)]
