"""The trainer's sharded path: FSDP2 and/or expert parallelism (h64lm/parallel) under torchrun.

Taken when several processes run with `hardware.strategy=fsdp` or `hardware.ep > 1`; plain DDP at
ep=1 keeps the path of h64lm/train/wrap.py. Here:
- the model is built on the meta device, activation checkpointing wraps each block first (as
  torchtitan does, so FSDP's units are the checkpointed blocks), then experts are split (EP), the
  blocks sharded (FSDP) and each rank materialises its shard of the weights a one-process run
  would start from (`build_parallel_model`);
- bf16 on GPU under FSDP is FSDP's MixedPrecisionPolicy (bf16 compute copies of fp32 master
  weights, fp32 gradient reduction) instead of autocast;
- checkpoints are the same as everywhere (h64lm/runtime/checkpoint): every rank writes its shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from h64lm.config import RunConfig
from h64lm.model import H64LMForCausalLM
from h64lm.parallel import build_mesh, build_parallel_model, check_layout
from h64lm.train.distributed import Dist
from h64lm.train.precision import Precision
from h64lm.train.wrap import apply_activation_checkpointing
from h64lm.validation import ConfigError

__all__ = ["is_sharded", "check_parallel_layout", "build_sharded_model"]


def is_sharded(run: RunConfig, world_size: int) -> bool:
    hw = run.hardware
    return world_size > 1 and (hw.strategy == "fsdp" or hw.ep > 1)


def check_parallel_layout(run: RunConfig, world_size: int) -> None:
    """One ConfigError line naming hardware.ep, before any data or model work."""
    try:
        check_layout(world_size, run.hardware.ep, run.model.num_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if run.hardware.ep > 1 and not run.model.moe_layer_indices():
        raise ConfigError(f"hardware.ep={run.hardware.ep} needs MoE layers, but model.moe_layers="
                          f"{run.model.moe_layers!r} makes a dense model; use hardware.ep=1")


def build_sharded_model(run: RunConfig, d: Dist, precision: Precision) -> tuple[nn.Module, nn.Module, bool]:
    """-> (model for evaluation, sampling and checkpoints; the module the training step calls;
    whether FSDP applies bf16 itself, so autocast must stay off)."""
    hw = run.hardware
    mesh = build_mesh(d.world_size, hw.ep, d.device.type, run.model.num_experts)

    def build() -> nn.Module:
        model = H64LMForCausalLM(run.model)
        if run.model.gradient_checkpointing:
            apply_activation_checkpointing(model)
        return model

    fsdp_bf16 = hw.strategy == "fsdp" and d.device.type == "cuda" and precision.name == "bf16"
    wrapped = build_parallel_model(build, mesh, hw.strategy, run.train.seed, d.device,
                                   param_dtype=torch.bfloat16 if fsdp_bf16 else torch.float32,
                                   reshard_after_forward=hw.reshard_after_forward)
    model = wrapped.module if isinstance(wrapped, DDP) else wrapped
    return model, torch.compile(wrapped) if hw.compile else wrapped, fsdp_bf16
