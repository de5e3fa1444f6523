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
from h64lm.objectives.balancing import prepare_global_balance
from h64lm.objectives.base import ObjectiveOutput, StepShare
from h64lm.objectives.router_terms import RouterTerm, router_terms

__all__ = ["LanguageModelling", "lm_loss"]


def lm_loss(out, config: H64LMConfig) -> torch.Tensor:
    """ce + sum_k c_k term_k of one forward with labels: the objective's loss of a lone
    micro-batch (w = 1, M = 1), for scripts and tests that train outside the trainer."""
    total = out.ce
    for term in router_terms(config):
        total = total + term.coef * term.value(out)
    return total


class LanguageModelling:
    def __init__(self, config: H64LMConfig, terms: Sequence[RouterTerm] | None = None):
        self.global_balance = config.router_aux_loss_scope == "global" and bool(config.moe_layer_indices())
        self.terms = list(router_terms(config) if terms is None else terms)

    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        if self.global_balance:  # f_i of the whole step, before any micro-batch's loss
            prepare_global_balance(model, [b.input_ids for b in batches])

    def __call__(self, model: nn.Module, batch: Batch, share: StepShare) -> ObjectiveOutput:
        packed = {} if batch.document_ids is None else {"document_ids": batch.document_ids}
        out = model(batch.input_ids, labels=batch.labels, return_logits=False, **packed)
        ce = out.ce * share.weight
        total = ce
        values = {}
        for term in self.terms:
            values[term.name] = term.value(out)
            total = total + term.coef * values[term.name]
        m = share.micro_batches
        terms = {"loss": total.detach() / m, "ce": ce.detach() / m,
                 **{k: v.detach() / m for k, v in values.items()}}
        return ObjectiveOutput(loss=total / m, terms=terms, router=out.router)

