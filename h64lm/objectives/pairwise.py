"""The objectives of the preference stages: a Bradley-Terry reward model and DPO / IPO.

Both read micro-batches of preference pairs (h64lm/data/preference_batches.py): rows 2i and 2i + 1
are pair i's chosen and rejected conversations, labels mark the answer's tokens, extras["last"]
[2P] each row's last real token (its `</s>`) and extras["pair"] [2P] the pair's index in its split.

Normalisation: the step's loss is the mean over the step's pairs (all micro-batches, all ranks).
Every micro-batch holds the same number of pairs (the loader guarantees it), so that mean is the
mean over micro-batches and ranks of each micro-batch's pair mean: each micro-batch contributes
its mean / M (`StepShare.micro_batches`) and data parallelism averages the ranks. The token-count
weight of `StepShare` is not used: a pair counts once whatever its answers' lengths. The metrics
(TRL's names, means over the micro-batch's pairs) follow the same convention, so the step reports
their means over the step's pairs.

RPO / "DPO + NLL" (Pang et al. 2024, `rpo_alpha` > 0) adds rpo_alpha x the negative log-likelihood
of the chosen answers, normalised per token: the mean over every chosen answer token of the step
(all micro-batches, all ranks), the global convention of the language-modelling objective, so the
term is exactly SFT's loss on the chosen answers. Its count is all-reduced once in `prepare_step`
(`chosen_tokens`); each micro-batch contributes its NLL sum x W / N_chosen (`StepShare`'s weight
with the chosen tokens' count), and summing over micro-batches and averaging over ranks gives the
step's mean. Logged as `nll_loss` (TRL's name), unweighted by alpha.

The router's terms (Switch balancing loss, z-loss; `router_terms`) are added as in language
modelling, and `router_aux_loss_scope=global` counts the step's routing first; the aux-free bias
update reads the routed loads of the policy's forwards, as in every stage. The frozen reference's
forwards are never in the loss and never in the loads.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.model.config import H64LMConfig
from h64lm.objectives.base import ObjectiveOutput, StepShare, sum_over_ranks
from h64lm.objectives.preference import DPO_REDUCTION, bradley_terry_loss, dpo_loss
from h64lm.objectives.router_terms import RouterLoss

__all__ = ["DirectPreference", "RewardModelling", "chosen_nll", "chosen_tokens", "pair_logprobs", "pair_scores",
           "reference_logprobs"]


def pair_scores(out, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each row: `out.scores` [2P, T] at the row's last real token -> (chosen [P],
    rejected [P])."""
    r = out.scores.gather(1, batch.extras["last"][:, None]).squeeze(1)  # [2P]
    return r[0::2], r[1::2]


def pair_logprobs(out, batch: Batch, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(answer | prompt) of each row from `out.token_logprobs` [2P, T] (0 off the answer),
    summed or averaged over the answer's tokens -> (chosen [P], rejected [P])."""
    total = out.token_logprobs.sum(-1)  # [2P]
    if reduction == "mean":
        total = total / (batch.labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total[0::2], total[1::2]


def chosen_nll(out, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum over the chosen rows' answer tokens of -log pi(token), their count), each []:
    `out.token_logprobs` is 0 off the answers."""
    return -out.token_logprobs[0::2].float().sum(), (batch.labels[0::2] != IGNORE_INDEX).sum()


def chosen_tokens(batches: Sequence[Batch]) -> torch.Tensor:
    """N_chosen: the chosen answers' target tokens of the whole step, all micro-batches and (one
    all-reduce when distributed) all ranks; fp32 [] on the batches' device, no host sync."""
    return sum_over_ranks(torch.stack([(b.labels[0::2] != IGNORE_INDEX).sum() for b in batches]).sum().float())


class _PairObjective:
    """What both objectives share: the global balancing pass and the router terms."""

    def __init__(self, config: H64LMConfig):
        self.router = RouterLoss(config)

    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        self.router.prepare_step(model, batches)

    def _output(self, loss: torch.Tensor, metrics: dict[str, float], out, share: StepShare,
                nll: Optional[tuple[float, torch.Tensor]] = None) -> ObjectiveOutput:
        """loss_m = (pair loss + sum_k c_k term_k) / M [+ alpha nll_m], with every term reported
        under the same convention; nll = (alpha, nll_m), nll_m already this micro-batch's share."""
        m = share.micro_batches
        total, values = self.router.add(loss, out)
        total = total / m
        terms = {"pair_loss": loss.detach() / m, **{k: v.detach() / m for k, v in values.items()},
                 **{k: torch.tensor(v, device=loss.device) / m for k, v in metrics.items()}}
        if nll is not None:
            alpha, share_nll = nll
            total = total + alpha * share_nll
            terms["nll_loss"] = share_nll.detach()
        return ObjectiveOutput(loss=total, terms={"loss": total.detach(), **terms}, router=out.router)


class RewardModelling(_PairObjective):
    """-log sigma(r_c - r_r) on the scalar head's rewards (`bradley_terry_loss`); no language-
    modelling loss, and no [B, T, V] logits."""

    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        out = model(batch.input_ids, return_logits=False)
        loss, metrics = bradley_terry_loss(*pair_scores(out, batch))
        return self._output(loss, metrics, out, share)


class DirectPreference(_PairObjective):
    """`dpo_loss` of the policy's log-probs against the reference's, which `reference(batch)`
    gives as [P, 2] (a frozen model run now, or a table precomputed at the start)."""

    def __init__(self, config: H64LMConfig, beta: float, loss_type: str, label_smoothing: float,
                 reference: Callable[[Batch], torch.Tensor], rpo_alpha: float = 0.0):
        super().__init__(config)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reduction = DPO_REDUCTION[loss_type]
        self.reference = reference
        self.rpo_alpha = rpo_alpha
        self.step_chosen_tokens: Optional[torch.Tensor] = None  # N_chosen of the step (rpo_alpha > 0)

    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        super().prepare_step(model, batches)
        if self.rpo_alpha:
            self.step_chosen_tokens = chosen_tokens(batches)

    def losses(self, out, batch: Batch, ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_logprobs(out, batch, self.reduction)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing)

    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        ref = self.reference(batch)  # [P, 2], before the policy's forward (FSDP: same order everywhere)
        out = model(batch.input_ids, labels=batch.labels, return_logits=False, token_logprobs=True)
        loss, metrics = self.losses(out, batch, ref)
        if not self.rpo_alpha:
            return self._output(loss, metrics, out, share)
        if self.step_chosen_tokens is None:
            raise RuntimeError("stage.rpo_alpha > 0: prepare_step must count the step's chosen tokens first")
        total_nll, _ = chosen_nll(out, batch)
        # sum_m / N_chosen x W: averaging the ranks (as DDP does the gradients) gives the step's mean
        share_nll = total_nll * share.world_size / self.step_chosen_tokens.clamp(min=1)
        return self._output(loss, metrics, out, share, (self.rpo_alpha, share_nll))


def reference_logprobs(reference: nn.Module, batch: Batch, reduction: str,
                       autocast: Callable = nullcontext) -> torch.Tensor:
    """[P, 2] log-probs (chosen, rejected) of `batch` under a frozen model, without touching the
    RNG stream the policy's forward draws from (dropout masks stay the policy's own)."""
    devices = [batch.input_ids.device] if batch.input_ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast():
        out = reference(batch.input_ids, labels=batch.labels, return_logits=False, token_logprobs=True)
    chosen, rejected = pair_logprobs(out, batch, reduction)
    return torch.stack([chosen, rejected], dim=1).float()
