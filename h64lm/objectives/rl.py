"""The RL stage's objective: GRPO (Shao et al. 2024) or PPO (Schulman et al. 2017) on rollouts.

`prepare_step` turns the step's prompt micro-batches into rollouts (h64lm/objectives/rollout.py):
G completions per prompt sampled by the current policy, rewarded (`RolloutReward`), scored by
the frozen reference (its per-token log-probs, `ref_logp`), with their advantages:
- grpo: `group_advantages` of the rewards within each prompt's group [R]; the loss is the clipped
  surrogate plus kl_coef * k3 KL to the reference per token (DeepSeekMath's form);
- ppo: one no-grad forward of the policy gives the values (`out.scores`, the value head shared
  with the trunk; the value of the action labelled at position p is scores[:, p]) and the
  sampling log-probs; the per-token reward is the terminal reward on the last action minus
  kl_coef * (logp_old - ref_logp) on every action (InstructGPT's KL penalty); `gae` gives the
  advantages and the value targets; with `whiten_advantages` the advantages (not the targets) are
  then whitened over the step's completion tokens, all micro-batches and ranks (`whiten`); the
  loss adds vf_coef * `clipped_value_loss`.

Sampling may be truncated (top_k, top_p); the ratio's and the KL's log-probs are still the
policy's over the whole vocabulary (TRL's and OpenRLHF's choice), not the truncated distribution's.

One update per rollout (mu = 1, DeepSeekMath's setting): the policy that sampled is the one being
trained, so the ratio's old log-probs are the current ones detached (ratio = 1, its gradient is
the policy gradient; the clip never binds and clip_fraction is 0 by construction). Nothing of a
rollout outlives its step, so a checkpoint needs no rollout state.

Normalisation: every micro-batch holds B * G rows, so a per-row mean counts 1 / M of the step
("sequence" aggregation); "token" aggregation weights a micro-batch by its share of the step's
completion tokens (`StepShare.weight`), so both are means over the whole step on every rank.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.model.config import H64LMConfig
from h64lm.objectives.base import ObjectiveOutput, StepShare, sum_over_ranks
from h64lm.objectives.policy import (clipped_policy_loss, clipped_value_loss, gae, group_advantages, terminal_rewards,
                                     whiten)
from h64lm.objectives.rollout import Rollout, sample_rollout
from h64lm.objectives.router_terms import RouterLoss

__all__ = ["RLSettings", "PolicyOptimisation", "RolloutReward"]

# (rollout, its prompt micro-batch) -> rewards [R] fp32 on the rollout's device
RolloutReward = Callable[[Rollout, Batch], torch.Tensor]


@dataclass(frozen=True)
class RLSettings:
    algorithm: str  # grpo | ppo
    group_size: int  # G
    max_new_tokens: int
    temperature: float
    clip_eps: float
    kl_coef: float  # beta
    advantage_scale: str  # grpo: std | none
    aggregation: str  # sequence | token
    gamma: float  # ppo
    lam: float  # ppo
    vf_coef: float  # ppo
    seed: int  # train.seed: with each prompt's stream position, the sampling seed
    eos_id: int
    fixed_length: bool = False  # decode max_new_tokens steps on every rank (sharded weights)
    top_k: int = 0  # rollouts sample among the k most likely tokens; 0: all
    top_p: float = 1.0  # rollouts sample from the nucleus of mass p; 1: all
    whiten_advantages: bool = False  # ppo: (A - mean) / std over the step's completion tokens, all ranks

    def __post_init__(self) -> None:
        if self.whiten_advantages and self.algorithm != "ppo":
            raise ValueError("whiten_advantages is PPO's: GRPO's advantages are normalised within each group")


class PolicyOptimisation:
    def __init__(self, settings: RLSettings, config: H64LMConfig, reference: nn.Module, reward: RolloutReward,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        self.s, self.reference, self.reward, self.autocast = settings, reference, reward, autocast
        self.router = RouterLoss(config)
        self.samples_per_s = 0.0  # this rank's completions per second of sampling, last step

    # ----------------------------------------------------------------------------- rollouts
    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> list[Batch]:
        s = self.s
        rollouts, seconds = [], 0.0
        for prompts in batches:
            start = time.perf_counter()
            with self.autocast():
                rollout = sample_rollout(model, prompts, s.group_size, s.max_new_tokens, s.temperature,
                                         s.eos_id, s.seed, s.fixed_length, s.top_k, s.top_p)
            seconds += time.perf_counter() - start
            rollouts.append(self._scored(model, rollout, self.reward(rollout, prompts).float()))
        self.samples_per_s = sum(b.input_ids.shape[0] for b in rollouts) / max(seconds, 1e-9)
        if s.whiten_advantages:  # the returns (value targets) keep the raw advantages
            whitened = whiten([b.extras["advantages"] for b in rollouts],
                              [b.labels != IGNORE_INDEX for b in rollouts], sum_over_ranks)
            for b, advantages in zip(rollouts, whitened):
                b.extras["advantages"] = advantages
        self.router.prepare_step(model, rollouts)
        return rollouts

    def _forward(self, model: nn.Module, batch: Batch):
        return model(batch.input_ids, labels=batch.labels, attention_mask=batch.extras["attention_mask"],
                     return_logits=False, token_logprobs=True)

    @torch.no_grad()
    def _scored(self, model: nn.Module, rollout: Rollout, rewards: torch.Tensor) -> Batch:
        """The rollout's batch with extras: rewards [R], ref_logp [R, S], advantages [R] (grpo) or
        [R, S] with returns, old_values, old_logp [R, S] (ppo)."""
        s, batch = self.s, rollout.batch
        mask = batch.labels != IGNORE_INDEX  # [R, S] the sampled actions
        with self.autocast():
            ref_logp = self._forward(self.reference, batch).token_logprobs  # train mode, as the policy's
        extras = {**batch.extras, "rewards": rewards, "ref_logp": ref_logp}
        if s.algorithm == "grpo":
            extras["advantages"] = group_advantages(rewards, s.group_size, s.advantage_scale)
        else:
            with self.autocast():
                out = self._forward(model, batch)
            values, old_logp = out.scores.float(), out.token_logprobs.float()
            per_token = terminal_rewards(rewards, mask) - s.kl_coef * (old_logp - ref_logp) * mask
            advantages, returns = gae(per_token, values, mask, gamma=s.gamma, lam=s.lam)
            extras.update(advantages=advantages, returns=returns, old_values=values, old_logp=old_logp)
        return replace(batch, extras=extras)

    # ----------------------------------------------------------------------------- the loss
    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        s, x = self.s, batch.extras
        out = self._forward(model, batch)
        logp = out.token_logprobs  # [R, S]
        mask = batch.labels != IGNORE_INDEX
        # "token": the micro-batch's share of the step's actions; "sequence": 1 of M equal parts
        weight = share.weight if s.aggregation == "token" else 1.0
        m = share.micro_batches
        old_logp = x["old_logp"] if "old_logp" in x else logp.detach()  # mu = 1: the sampling policy
        pg, metrics = clipped_policy_loss(
            logp, old_logp, x["advantages"], mask, clip_eps=s.clip_eps, ref_logp=x["ref_logp"],
            kl_beta=s.kl_coef if s.algorithm == "grpo" else 0.0, aggregation=s.aggregation)
        total = pg * weight
        terms = {"pg_loss": pg.detach() * weight}
        if s.algorithm == "ppo":
            vf = clipped_value_loss(out.scores, x["old_values"], x["returns"], mask, clip_eps=s.clip_eps,
                                    aggregation=s.aggregation)
            total = total + s.vf_coef * vf * weight
            terms["value_loss"] = vf.detach() * weight
            terms["value/mean"] = (x["old_values"] * mask).sum() / mask.sum().clamp(min=1)
        total, values = self.router.add(total, out)
        terms.update({k: v.detach() for k, v in values.items()})
        rewards = x["rewards"]
        groups = rewards.view(-1, s.group_size) if s.group_size > 1 else rewards.view(1, -1)
        device = logp.device
        terms.update({
            "reward/mean": rewards.mean(),
            "reward/std": groups.std(dim=1).mean() if groups.shape[1] > 1 else torch.zeros((), device=device),
            "kl": torch.tensor(metrics["kl"], device=device),
            "clip_fraction": torch.tensor(metrics["clip_ratio"], device=device),
            "completion_length": mask.sum(1).float().mean(),
            "samples_per_s": torch.tensor(self.samples_per_s, device=device),
        })
        terms = {"loss": total.detach() / m, **{k: v.float() / m for k, v in terms.items()}}
        return ObjectiveOutput(loss=total / m, terms=terms, router=out.router)
