"""One optimizer step: `grad_accum` micro-batches forward/backward, one collective, one update.

Everything every rank must agree on after the micro-batches (the losses, whether the step was
non-finite, whether a stop was requested, the expert loads) travels in ONE all-reduce of one
flat tensor, described by `StepStats`' named fields rather than positional offsets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

__all__ = ["StepStats", "LayerLoad", "reduce_stats", "no_sync_unless"]


@dataclass
class LayerLoad:
    load: list[float]  # [E] share of the step's top-k assignments each expert received
    dropped: float  # share of assignments over capacity

    @property
    def max_over_mean(self) -> float:
        return max(self.load) * len(self.load)


@dataclass
class StepStats:
    """What one step reports, averaged over micro-batches and ranks."""

    loss: float
    ce: float
    aux: float
    z: float
    nonfinite: bool  # some rank's loss was NaN/Inf
    stop_requested: bool  # some rank received SIGINT/SIGTERM
    router: dict[int, LayerLoad] = field(default_factory=dict)  # MoE layer index -> load
    grad_norm: float = math.nan
    lr: float = math.nan
    skipped: bool = False  # the update was not applied (non-finite loss or gradients)


def reduce_stats(losses: torch.Tensor, loads: dict[int, torch.Tensor], dropped: dict[int, torch.Tensor],
                 stop_requested: bool, world_size: int) -> StepStats:
    """losses [4] (loss, ce, aux, z), loads {layer: [E]}, dropped {layer: []}, each already the mean
    over this rank's micro-batches -> the mean over ranks, with a single host copy."""
    layers = sorted(loads)
    flags = torch.stack([(~torch.isfinite(losses[0])).float(),  # stays on the device: no sync
                         torch.tensor(float(stop_requested), device=losses.device)])
    pieces = [losses, flags] + [torch.cat([loads[i], dropped[i].view(1)]) for i in layers]
    sizes = [p.numel() for p in pieces]
    packed = torch.cat(pieces)
    if world_size > 1:
        torch.distributed.all_reduce(packed)
    values = packed.tolist()  # the step's one device -> host copy
    parts, at = [], 0
    for n in sizes:
        parts.append(values[at:at + n])
        at += n
    (loss, ce, aux, z), (nonfinite, stop), per_layer = parts[0], parts[1], parts[2:]
    mean = 1.0 / world_size
    router = {i: LayerLoad(load=[v * mean for v in p[:-1]], dropped=p[-1] * mean)
              for i, p in zip(layers, per_layer)}
    return StepStats(loss=loss * mean, ce=ce * mean, aux=aux * mean, z=z * mean,
                     nonfinite=nonfinite > 0, stop_requested=stop > 0, router=router)


def no_sync_unless(sync: bool, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce only on the last micro-batch of a step."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
