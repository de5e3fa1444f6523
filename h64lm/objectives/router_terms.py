"""Auxiliary loss terms of the MoE router, each a weighted per-micro-batch scalar.

A term is a name, a coefficient and a function of the model output; the language-modelling
objective adds coef * value for each. Adding a term means adding one here (or in a new file)
and listing it in `router_terms`; the trainer reports it as `<name>` with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from h64lm.model.config import H64LMConfig

__all__ = ["RouterTerm", "router_terms"]


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
