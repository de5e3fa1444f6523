"""Next-token language modelling: cross-entropy over the targets plus the router's terms.

loss_m = (w_m * CE_m + sum_k c_k * term_k) / M for micro-batch m, with CE_m the mean token
cross-entropy of its targets and w_m its `StepShare.weight`. The router terms (Switch
load-balancing, z-loss; `h64lm/objectives/router_terms.py`) are per-token means over every
routed token, so each micro-batch counts 1 / M. With equal unmasked micro-batches (w = 1) this is
exactly the loss of earlier versions, mean over micro-batches of ce + aux_coef aux + z_coef z.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from h64lm.data.batch import Batch
from h64lm.model.config import H64LMConfig
from h64lm.objectives.base import ObjectiveOutput, StepShare
from h64lm.objectives.router_terms import RouterLoss, RouterTerm

__all__ = ["LanguageModelling", "lm_loss"]


def lm_loss(out, config: H64LMConfig) -> torch.Tensor:
    """ce + sum_k c_k term_k of one forward with labels: the objective's loss of a lone
    micro-batch (w = 1, M = 1), for scripts and tests that train outside the trainer."""
    return RouterLoss(config).add(out.ce, out)[0]


class LanguageModelling:
    def __init__(self, config: H64LMConfig, terms: Sequence[RouterTerm] | None = None):
        self.router = RouterLoss(config, terms)

    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        self.router.prepare_step(model, batches)

    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        packed = {} if batch.document_ids is None else {"document_ids": batch.document_ids}
        out = model(batch.input_ids, labels=batch.labels, return_logits=False, **packed)
        ce = out.ce * share.weight
        total, values = self.router.add(ce, out)
        m = share.micro_batches
        terms = {"loss": total.detach() / m, "ce": ce.detach() / m,
                 **{k: v.detach() / m for k, v in values.items()}}
        return ObjectiveOutput(loss=total / m, terms=terms, router=out.router)

