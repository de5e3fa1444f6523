"""Balancing state set on the MoE layers from outside the forward pass.

Both functions take counts that the caller has already summed over the optimizer step's
micro-batches and all-reduced over data-parallel ranks, so the model holds no distributed code
(`h64lm.objectives.balancing` does the counting and the all-reduce).
"""

from typing import Dict, Mapping

import torch
from torch import nn

from .layer import MoELayer

__all__ = ["moe_layers", "set_global_counts", "update_router_bias"]


def moe_layers(model: nn.Module) -> Dict[int, MoELayer]:
    """{layer index: MoELayer} of an H64LMForCausalLM (or a wrapper exposing `.module`)."""
    model = getattr(model, "module", model)  # DDP
    return {i: block.ffn for i, block in enumerate(model.layers) if block.sparse}


def set_global_counts(model: nn.Module, counts_per_layer: Mapping[int, torch.Tensor],
                      total_tokens: int, num_micro_batches: int) -> None:
    """For model.router_aux_loss_scope=global: the step's routed counts {layer: [E]}, its token
    count and its number of micro-batches, all summed over micro-batches and ranks."""
    layers = moe_layers(model)
    if set(counts_per_layer) != set(layers):
        raise ValueError(f"counts for layers {sorted(counts_per_layer)} but the MoE layers are "
                         f"{sorted(layers)}")
    for i, layer in layers.items():
        layer.set_global_balance(counts_per_layer[i], total_tokens, num_micro_batches)


@torch.no_grad()
def update_router_bias(model: nn.Module, counts_per_layer: Mapping[int, torch.Tensor]) -> None:
    """Aux-loss-free balancing (DeepSeek-V3), after optimizer.step():
    b_i += rate * sign(mean_j c_j - c_i) with c [E] the step's routed counts of a layer (any
    positive scale works: loads or counts, summed or averaged). Overloaded experts become less
    likely to be selected, underloaded ones more; gate weights never see b."""
    model_ = getattr(model, "module", model)
    rate = model_.config.router_bias_update_rate
    if rate <= 0:
        raise ValueError("update_router_bias needs model.router_bias_update_rate > 0")
    for i, layer in moe_layers(model_).items():
        c = counts_per_layer[i].to(layer.router.bias.device, torch.float32)
        layer.router.bias += rate * torch.sign(c.mean() - c)
