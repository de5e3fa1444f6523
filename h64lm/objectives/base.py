"""The objective seam: what a training stage computes from a micro-batch.

An objective owns the forward pass, the loss and its named terms (OLMo-core's train-module idea,
at the size this repo needs). The trainer knows none of the terms: it sums `loss` over the
step's micro-batches for backward and reports every entry of `terms` by name, so a new loss term
or a new stage (SFT, DPO) never touches the step function.

Normalisation: the step's loss is the mean over the target tokens of the WHOLE optimizer step
(all micro-batches, all ranks; torchtitan's `global_valid_tokens`, OLMo-core's
`batch_num_tokens_for_loss`), not a mean of per-micro-batch means, which would weight a token of
a sparsely-labelled micro-batch more than one of a dense one. `StepShare` carries the counts; the
trainer all-reduces them once per step, before any backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from h64lm.data.batch import Batch

__all__ = ["Objective", "ObjectiveOutput", "StepShare", "sum_over_ranks"]


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """t summed over every rank in place (the default group, whose ranks each hold their own
    micro-batches, as `StepShare.world_size` counts them); t itself in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@dataclass(frozen=True)
class StepShare:
    """One micro-batch's place in its optimizer step."""

    targets: int  # target tokens of this micro-batch (Batch.num_targets())
    step_targets: int  # target tokens of the whole step: every micro-batch on every rank
    micro_batches: int  # M: micro-batches per rank in the step
    world_size: int  # W: ranks averaging their gradients

    @property
    def weight(self) -> float:
        """w = n_m W M / N: what this micro-batch's mean per-target loss weighs against an average
        micro-batch's. Summing (w * mean_m) / M over micro-batches and averaging over ranks (as
        data parallelism does with gradients) gives sum(token losses) / N; w is exactly 1.0 when
        every micro-batch holds the same number of targets (today's unmasked runs)."""
        if self.step_targets == 0:
            return 0.0
        return self.targets * self.world_size * self.micro_batches / self.step_targets


@dataclass
class ObjectiveOutput:
    # This micro-batch's share of the step's loss: summed over the step's micro-batches (and
    # averaged over ranks) it is the step's loss; backward runs on it.
    loss: torch.Tensor
    # Named values under the same convention, detached: every one is reported by its name.
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per MoE layer {"layer", "load" [E], "counts" [E], "dropped"} for load statistics.
    router: list[dict[str, Any]] = field(default_factory=list)


class Objective(Protocol):
    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> Optional[Sequence[Batch]]:
        """Called once per optimizer step with the unwrapped model (no DDP / compile wrapper) and
        this rank's micro-batches (on the device) before any forward and before the step's
        targets and input tokens are counted: e.g. global-batch load-balancing counts, or an RL
        stage turning prompt batches into rollouts (set their `Batch.real_tokens`). -> the
        micro-batches to train on, or None to keep `batches`. Collective when the ranks must
        agree."""

    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        """Forward `batch` through `model` (the module the step trains: DDP/FSDP/compiled)."""
