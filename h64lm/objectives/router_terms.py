"""Auxiliary loss terms of the MoE router, each a weighted per-micro-batch scalar.

A term is a name, a coefficient and a function of the model output; every objective adds
coef * value for each through `RouterLoss`. Adding a term means adding one here (or in a new file)
and listing it in `router_terms`; the trainer reports it as `<name>` with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from h64lm.data.batch import Batch
from h64lm.model.config import H64LMConfig
from h64lm.objectives.balancing import prepare_global_balance

__all__ = ["RouterLoss", "RouterTerm", "router_terms"]


@dataclass(frozen=True)
class RouterTerm:
    name: str  # the metric name (metrics.jsonl, W&B)
    coef: float
    value: Callable[[object], torch.Tensor]  # CausalLMOutput -> scalar


def router_terms(config: H64LMConfig) -> list[RouterTerm]:
    """Switch load-balancing loss E sum_i f_i P_i and the router z-loss, each the mean over MoE
    layers (the model computes both per layer; 0 for a dense model)."""
    return [RouterTerm("aux", config.router_aux_loss_coef, lambda out: out.aux),
            RouterTerm("z", config.router_z_loss_coef, lambda out: out.z)]


class RouterLoss:
    """The router's part of every objective (language modelling, preference, RL): the weighted
    terms added to the objective's own loss, and with `router_aux_loss_scope=global` the step's
    routing counted on its micro-batches before any of their losses."""

    def __init__(self, config: H64LMConfig, terms: Optional[Sequence[RouterTerm]] = None):
        self.terms = list(router_terms(config) if terms is None else terms)
        self.global_balance = config.router_aux_loss_scope == "global" and bool(config.moe_layer_indices())

    def prepare_step(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        if self.global_balance:  # f_i of the whole step, before any micro-batch's loss
            prepare_global_balance(model, [b.input_ids for b in batches])

    def add(self, total: torch.Tensor, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total + sum_k c_k term_k(out), added in order; {name: term_k(out)})."""
        values = {}
        for term in self.terms:
            values[term.name] = term.value(out)
            total = total + term.coef * values[term.name]
        return total, values
