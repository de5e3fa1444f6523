"""Validation loss, split across ranks: the model's mean next-token loss over fixed windows of a
token stream (pretraining, `evaluate`) or over the target tokens of fixed batches (packed
conversations with prompt tokens masked, `evaluate_batches`)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import Precision

__all__ = ["evaluate", "evaluate_batches", "sharded_sums"]


def sharded_sums(model: nn.Module, n_items: int, shard_len: int, chunk: int, d: Dist,
                 should_stop: Callable[[], bool], size: int,
                 sums: Callable[[int, bool], torch.Tensor]) -> torch.Tensor | None:
    """The model in eval(): sum over i in range(0, this rank's share, chunk) of `sums(i, counted)`
    (a [size] vector), then over ranks -> float64 [size] on the device. `counted` False: a rank out
    of items repeats one for the collectives and must return zeros. None when a stop was requested
    (see `evaluate`)."""
    was_training = model.training
    model.eval()
    lockstep = d.enabled and any(isinstance(p, DTensor) for p in model.parameters())
    per_rank = -(-n_items // d.world_size) if lockstep else shard_len  # the most any rank holds
    total = torch.zeros(size + 1, dtype=torch.float64, device=d.device)  # [sums..., stopped]
    steps = range(0, per_rank, chunk)
    for i in tqdm(steps, desc="validation", leave=False, disable=not d.is_main or len(steps) < 4):
        stop = should_stop()
        if lockstep:
            flag = torch.tensor(float(stop), device=d.device)
            dist.all_reduce(flag)
            stop = bool(flag > 0)
        if stop:
            total[-1] = 1
            break
        total[:-1] += sums(i, i < shard_len)
    if d.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return None if total[-1] > 0 else total[:-1]


def _mean_loss(model: nn.Module, n_items: int, shard_len: int, chunk: int, d: Dist,
               should_stop: Callable[[], bool],
               loss_sum: Callable[[int, bool], tuple[torch.Tensor | float, int]]) -> tuple[float, float] | None:
    """(mean token loss, perplexity) from `loss_sum(i, counted)` -> (sum of token losses, tokens)
    over `sharded_sums`."""
    def sums(i: int, counted: bool) -> torch.Tensor:
        losses, n = loss_sum(i, counted)
        return torch.stack([torch.as_tensor(losses, dtype=torch.float64, device=d.device),
                            torch.tensor(float(n), dtype=torch.float64, device=d.device)])

    total = sharded_sums(model, n_items, shard_len, chunk, d, should_stop, 2, sums)
    if total is None:
        return None
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


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
    shard = windows[d.rank :: d.world_size]

    def loss_sum(i: int, counted: bool) -> tuple[torch.Tensor, int]:
        w = (shard[i : i + batch_size] if counted else windows[:1]).to(d.device, non_blocking=True)
        with precision.autocast():
            out = model(w[:, :-1], labels=w[:, 1:], return_logits=False)
        n = w[:, 1:].numel() if counted else 0
        return out.ce.double() * n, n

    return _mean_loss(model, len(windows), len(shard), batch_size, d, should_stop, loss_sum)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches: list[Batch], precision: Precision, d: Dist,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[float, float] | None:
    """Mean loss (nats/target token) and perplexity over every target of `batches` (the same list
    on every rank; rank r takes batches r, r + W, ...): the sum of token losses over the count of
    targets, so a batch holding more assistant tokens weighs more, as in training. Stopping and
    sharded weights are handled as in `evaluate`."""
    shard = batches[d.rank :: d.world_size]

    def loss_sum(i: int, counted: bool) -> tuple[torch.Tensor | float, int]:
        batch = (shard[i] if counted else batches[0]).to(d.device)
        with precision.autocast():
            logits = model(batch.input_ids, document_ids=batch.document_ids, router_stats=False).logits
        if not counted:
            return 0.0, 0
        # logits [B, T, V] -> per-token losses summed in fp32; labels [B, T] already aligned
        return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum").double(), batch.num_targets()

    return _mean_loss(model, len(batches), len(shard), 1, d, should_stop, loss_sum)
