"""What the trainer calls for global-batch load balancing and aux-loss-free router biases.

Global balancing (`model.router_aux_loss_scope=global`; Megatron's global aux loss, Qwen's
global-batch balancing): f_i must count the whole optimizer step's tokens, all micro-batches on all
ranks, before any micro-batch's loss is formed. `prepare_global_balance` gets those counts exactly
with a no-grad counting pass: one extra forward per micro-batch (a forward is about a third of
forward + backward, so ~+33% compute per step, ~+25% with activation checkpointing, which already
runs the forward twice) plus one all-reduce of layers x E + 2 numbers. Nothing cheaper is exact:
counts from the previous step or a running average change the loss.

Call sequence for one optimizer step (the trainer's side; `raw` is the model without DDP):

    micro = [loader.next_batch() for _ in range(accum)]                      # keep the step's batches
    counts = prepare_global_balance(raw, [x for x, _ in micro], group)       # scope=global only
    for x, y in micro: (lm_loss(model(x, labels=y), cfg) / accum).backward()  # DDP averages ranks
    optimizer.step(); optimizer.zero_grad()
    bias.set_loads(step's loads)          # RouterBiasUpdate: runs after optimizer.step()
"""

from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from h64lm.model.moe.balance import moe_layers, set_global_counts, update_router_bias

__all__ = ["prepare_global_balance", "update_router_bias", "all_reduce_counts",
           "accumulate_counts", "RouterBiasUpdate"]


def accumulate_counts(totals: Dict[int, torch.Tensor], router: Sequence[dict]) -> None:
    """Add one forward's `out.router` routed counts into totals {layer: [E]} (in place)."""
    for r in router:
        counts = r["counts"].float()
        totals[r["layer"]] = totals[r["layer"]] + counts if r["layer"] in totals else counts


def all_reduce_counts(totals: Mapping[int, torch.Tensor],
                      process_group: Optional[dist.ProcessGroup] = None) -> Dict[int, torch.Tensor]:
    """Sum {key: 1-d tensor} over the ranks of process_group in one collective (no-op without one)."""
    layers = sorted(totals)
    if not layers or not (dist.is_available() and dist.is_initialized()):
        return dict(totals)
    sizes = [totals[i].numel() for i in layers]
    packed = torch.cat([totals[i].float().reshape(-1) for i in layers])  # one collective
    dist.all_reduce(packed, group=process_group)
    return dict(zip(layers, packed.split(sizes)))


@torch.no_grad()
def prepare_global_balance(model: nn.Module, micro_batches: Sequence[torch.Tensor],
                           process_group: Optional[dist.ProcessGroup] = None
                           ) -> Dict[int, torch.Tensor]:
    """Count the step's routing and set it on the MoE layers; returns {layer: counts [E]} summed
    over micro-batches and ranks (reusable for `update_router_bias`).

    micro_batches: this rank's input_ids [B, T], in the order the step will run them. The pass
    runs in the model's current mode; the RNG state is restored afterwards, so with dropout the
    training forwards draw the same masks and route exactly as counted."""
    layers = moe_layers(model)
    for layer in layers.values():  # the counting pass's own aux loss is discarded: make it 0
        layer.set_global_balance(torch.zeros(layer.num_experts), 0, 0)
    totals: Dict[int, torch.Tensor] = {}
    tokens = 0
    devices = [t.device for t in micro_batches if t.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        for input_ids in micro_batches:
            accumulate_counts(totals, model(input_ids, return_logits=False).router)
            tokens += input_ids.numel()
    device = next(iter(totals.values())).device if totals else torch.device("cpu")
    sizes = all_reduce_counts({-1: torch.tensor([float(tokens), float(len(micro_batches))],
                                                device=device), **totals}, process_group)
    total_tokens, num_micro = (int(v) for v in sizes.pop(-1).tolist())
    set_global_counts(model, sizes, total_tokens, num_micro)
    return sizes


class RouterBiasUpdate:
    """DeepSeek-V3 aux-loss-free balancing, registered once: an optimizer post-step hook moves
    each router's selection bias with the loads the trainer set for the step. A skipped step
    (no optimizer.step(), or the fp16 scaler skipping it) moves nothing.

    Only built when `model.router_bias_update_rate > 0` (the one place the trainer reads it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.loads: Optional[Dict[int, torch.Tensor]] = None
        self.handle = optimizer.register_step_post_hook(self._after_step)

    def set_loads(self, loads: Mapping[int, torch.Tensor]) -> None:
        """{layer: [E]} the step's loads or routed counts over all ranks (any positive scale)."""
        self.loads = dict(loads)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.loads is not None:
            update_router_bias(self.model, self.loads)
            self.loads = None

    def nonfinite(self) -> torch.Tensor:
        """0-d count of non-finite bias entries (stays on the device): a NaN/Inf bias routes
        tokens arbitrarily while the loss stays finite, so the trainer treats it as divergence."""
        biases = [layer.router.bias for layer in moe_layers(self.model).values()]
        return sum((~torch.isfinite(b)).sum() for b in biases) if biases else torch.zeros(())
