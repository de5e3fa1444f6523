"""One optimizer step's forward/backward and its statistics, whatever the objective.

`forward_backward` runs an objective over the step's micro-batches: it counts the step's target
tokens once (one all-reduce, before any backward, so every micro-batch's loss is normalised by
the global count), backpropagates each micro-batch's share and accumulates the named terms.
The same all-reduce counts the step's input tokens (`Batch.num_inputs`: the positions the
trained forward processes, padding left out, after `prepare_step`, so an RL step counts its
rollouts): the trainer's `tokens` and `tokens_per_s` for every stage.
Everything every rank must agree on afterwards (the terms, whether the step was non-finite,
whether a stop was requested, the expert loads) travels in ONE all-reduce of one flat tensor,
described by `StepStats`' named fields and term names rather than positional offsets.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from h64lm.data.batch import Batch
from h64lm.objectives.base import Objective, StepShare

__all__ = ["StepCounts", "StepStats", "LayerLoad", "forward_backward", "reduce_stats", "no_sync_unless", "count_step"]


@dataclass
class LayerLoad:
    load: list[float]  # [E] share of the step's top-k assignments each expert received
    dropped: float  # share of assignments over capacity

    @property
    def max_over_mean(self) -> float:
        return max(self.load) * len(self.load)


@dataclass
class StepStats:
    """What one step reports: the objective's named terms summed over micro-batches and averaged
    over ranks ("loss" first), and the step's flags and loads."""

    terms: dict[str, float]
    nonfinite: bool  # some rank's loss was NaN/Inf
    stop_requested: bool  # some rank received SIGINT/SIGTERM
    router: dict[int, LayerLoad] = field(default_factory=dict)  # MoE layer index -> load
    grad_norm: float = math.nan
    lr: float = math.nan
    skipped: bool = False  # the update was not applied (non-finite loss, gradients or router state)
    tokens: int = 0  # input tokens of the step over every micro-batch and rank (`StepCounts.inputs`)

    @property
    def loss(self) -> float:
        return self.terms["loss"]


@dataclass(frozen=True)
class StepCounts:
    targets: list[int]  # [M] this rank's target tokens per micro-batch
    step_targets: int  # N: target tokens over every micro-batch and rank
    inputs: int  # non-padding input positions over every micro-batch and rank


def count_step(batches: Sequence[Batch], world_size: int, device: torch.device) -> StepCounts:
    """The step's counts, summed over ranks in one all-reduce. On host batches there is no device
    sync."""
    targets = [b.num_targets() for b in batches]
    totals = [sum(targets), sum(b.num_inputs() for b in batches)]
    if world_size > 1:
        t = torch.tensor(totals, dtype=torch.float64, device=device)  # exact integers below 2^53
        dist.all_reduce(t)
        totals = [int(v) for v in t.tolist()]
    return StepCounts(targets, *totals)


def forward_backward(objective: Objective, model: nn.Module, raw_model: nn.Module, batches: Sequence[Batch],
                     world_size: int, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                     backward: Callable[[torch.Tensor], None]):
    """-> (terms {name: this rank's sum over micro-batches}, loads {layer: [E]}, dropped {layer: []},
    the step's input tokens over all ranks), loads and dropped averaged over micro-batches. `model`
    is what the step trains (DDP/FSDP/compiled), `raw_model` the module under it; `backward(loss)`
    applies any loss scaling."""
    on_device = [b.to(device) for b in batches]
    prepared = objective.prepare_step(raw_model, on_device)
    # counted on the host batches (no device sync) unless the objective made new ones (rollouts)
    counts = count_step(batches if prepared is None else prepared, world_size, device)
    batches = on_device if prepared is None else prepared
    terms: dict[str, torch.Tensor] = {}
    loads: dict[int, torch.Tensor] = {}
    dropped: dict[int, torch.Tensor] = {}
    accum = len(batches)
    for micro, batch in enumerate(batches):
        share = StepShare(counts.targets[micro], counts.step_targets, accum, world_size)
        with no_sync_unless(micro == accum - 1, model):
            with autocast():
                out = objective(model, batch, share)
            backward(out.loss)
        for name, value in out.terms.items():
            value = value.float()
            terms[name] = terms[name] + value if name in terms else value
        for r in out.router:
            loads[r["layer"]] = loads.get(r["layer"], 0) + r["load"].detach().float() / accum
            dropped[r["layer"]] = dropped.get(r["layer"], 0) + r["dropped"].detach().float() / accum
    return terms, loads, dropped, counts.inputs


def reduce_stats(terms: dict[str, torch.Tensor], loads: dict[int, torch.Tensor],
                 dropped: dict[int, torch.Tensor], stop_requested: bool, world_size: int,
                 extra_nonfinite: torch.Tensor | None = None) -> StepStats:
    """terms {name: []} (this rank's sums over micro-batches; "loss" decides non-finiteness),
    loads {layer: [E]}, dropped {layer: []} (means over micro-batches) -> the mean over ranks,
    in one all-reduce and one host copy. `extra_nonfinite` (a 0-d tensor, > 0 = bad) adds another
    divergence signal, e.g. a non-finite router bias."""
    names, layers = list(terms), sorted(loads)
    device = terms["loss"].device
    bad = (~torch.isfinite(terms["loss"])).float()  # stays on the device: no sync
    if extra_nonfinite is not None:
        bad = bad + extra_nonfinite.float().to(device)
    flags = torch.stack([bad, torch.tensor(float(stop_requested), device=device)])
    pieces = [torch.stack([terms[n].float() for n in names]), flags]
    pieces += [torch.cat([loads[i], dropped[i].view(1)]) for i in layers]
    sizes = [p.numel() for p in pieces]
    packed = torch.cat(pieces)
    if world_size > 1:
        torch.distributed.all_reduce(packed)
    values = packed.tolist()  # the step's one device -> host copy
    parts, at = [], 0
    for n in sizes:
        parts.append(values[at:at + n])
        at += n
    term_values, (nonfinite, stop), per_layer = parts[0], parts[1], parts[2:]
    mean = 1.0 / world_size
    router = {i: LayerLoad(load=[v * mean for v in p[:-1]], dropped=p[-1] * mean)
              for i, p in zip(layers, per_layer)}
    return StepStats(terms={n: v * mean for n, v in zip(names, term_values)},
                     nonfinite=nonfinite > 0, stop_requested=stop > 0, router=router)


def no_sync_unless(sync: bool, model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce only on the last micro-batch of a step."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
