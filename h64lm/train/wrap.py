"""Training techniques applied around the model from outside, as torchtitan does: activation
checkpointing of each block, data parallelism, compilation. The model code knows none of them."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel as DDP

from h64lm.config import RunConfig
from h64lm.train.distributed import Dist

__all__ = ["apply_activation_checkpointing", "wrap_for_training"]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (in place).

    The wrapper keeps parameter and state_dict names unchanged, so checkpoints are interchangeable
    with and without it."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def wrap_for_training(model: nn.Module, run: RunConfig, d: Dist) -> nn.Module:
    """The module the training step calls: `model` with checkpointing, DDP and compile applied.
    Evaluation, sampling and checkpoints use `model` itself."""
    if run.model.gradient_checkpointing:
        apply_activation_checkpointing(model)
    wrapped = model
    if d.enabled:
        wrapped = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if run.hardware.compile:
        wrapped = torch.compile(wrapped)
    return wrapped
