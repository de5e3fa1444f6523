"""Activation checkpointing applied around the model from outside, as torchtitan does (the model
code knows nothing of it); data parallelism and compilation are applied in h64lm/train/sharded.py."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

__all__ = ["apply_activation_checkpointing"]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (in place).

    The wrapper keeps parameter and state_dict names unchanged, so checkpoints are interchangeable
    with and without it."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
