"""Validation loss over fixed windows: the model's mean next-token loss, split across ranks."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import Precision

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, windows: torch.Tensor, batch_size: int, precision: Precision, d: Dist,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[float, float] | None:
    """Mean next-token loss (nats/token) and perplexity over `windows[N, T+1]`, split across ranks.

    `should_stop` is checked between batches: when it says stop on any rank, every rank returns
    None (the ranks agree through the one all-reduce that sums the losses anyway).

    Sharded weights (FSDP / expert parallelism: DTensor parameters) make every forward a
    collective, so there every rank runs the same number of batches (a rank out of windows
    repeats one, counted as 0 tokens) and the ranks agree on stopping before each batch."""
    was_training = model.training
    model.eval()
    shard = windows[d.rank :: d.world_size]
    lockstep = d.enabled and any(isinstance(p, DTensor) for p in model.parameters())
    per_rank = -(-len(windows) // d.world_size) if lockstep else len(shard)  # the most any rank holds
    total = torch.zeros(3, dtype=torch.float64, device=d.device)  # [sum of token losses, tokens, stopped]
    batches = range(0, per_rank, batch_size)
    for i in tqdm(batches, desc="validation", leave=False, disable=not d.is_main or len(batches) < 4):
        stop = should_stop()
        if lockstep:
            flag = torch.tensor(float(stop), device=d.device)
            dist.all_reduce(flag)
            stop = bool(flag > 0)
        if stop:
            total[2] = 1
            break
        w = (shard[i : i + batch_size] if i < len(shard) else windows[:1]).to(d.device, non_blocking=True)
        with precision.autocast():
            out = model(w[:, :-1], labels=w[:, 1:], return_logits=False)
        n = w[:, 1:].numel() if i < len(shard) else 0
        total[0] += out.ce.double() * n
        total[1] += n
    if d.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    if total[2] > 0:
        return None
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))
