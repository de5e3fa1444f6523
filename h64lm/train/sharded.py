"""Building the trainer's model in every layout: one process, DDP, FSDP2 and expert parallelism
(h64lm/parallel).

- every run (one process, DDP, FSDP, EP) builds its model the same way: on the meta device,
  activation checkpointing wraps each block first (as torchtitan does, so FSDP's units are the
  checkpointed blocks), then experts are split (EP), the blocks sharded (FSDP) and each rank
  materialises its shard of the weights a one-process run would start from (`build_model`);
- bf16 on GPU under FSDP is FSDP's MixedPrecisionPolicy (bf16 compute copies of fp32 master
  weights, fp32 gradient reduction) instead of autocast;
- checkpoints are the same as everywhere (h64lm/runtime/checkpoint): every rank writes its shards.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from h64lm.config import RunConfig
from h64lm.model import H64LMForCausalLM
from h64lm.parallel import ParallelLayout, build_mesh, build_parallel_model
from h64lm.runtime.distributed import Dist
from h64lm.runtime.precision import Precision
from h64lm.train.freeze import freeze_parameters
from h64lm.train.wrap import apply_activation_checkpointing

__all__ = ["build_model"]


def build_model(run: RunConfig, layout: ParallelLayout, d: Dist, precision: Precision,
                prepare: Optional[Callable[[nn.Module], None]] = None) -> tuple[nn.Module, nn.Module, bool]:
    """Every layout, one process included, through the parallel layer. `prepare(model)` edits the
    full model before it is split (train.init_from). -> (model for evaluation, sampling and
    checkpoints; the module the training step calls; whether FSDP applies bf16 itself, so
    autocast must stay off)."""
    hw = run.hardware
    mesh = build_mesh(layout, d.device.type) if d.enabled else None

    def build() -> nn.Module:
        model = H64LMForCausalLM(run.model)
        # before any wrapper: the flag travels into EP / FSDP shards, and DDP skips frozen weights
        freeze_parameters(model, run.train.freeze, run.train.trainable)
        if run.model.gradient_checkpointing:
            apply_activation_checkpointing(model)
        return model

    fsdp_bf16 = layout.strategy == "fsdp" and d.enabled and d.device.type == "cuda" and precision.name == "bf16"
    wrapped = build_parallel_model(build, layout, mesh, run.train.seed, d.device,
                                   param_dtype=torch.bfloat16 if fsdp_bf16 else torch.float32,
                                   reshard_after_forward=hw.reshard_after_forward, prepare=prepare)
    model = wrapped.module if isinstance(wrapped, DDP) else wrapped
    return model, torch.compile(wrapped) if hw.compile else wrapped, fsdp_bf16
