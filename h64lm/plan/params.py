"""Per-rank bytes of parameters, gradients and optimizer state (AdamW, or Muon + AdamW), counted
tensor by tensor from the real module structure (built on the `meta` device, so a 7B model costs
no memory).

Sharding rules (what each rank keeps between steps):
  - expert parallelism (EP degree `ep`): the stacked expert tensors [E, ...] are split on dim 0,
    each rank holds E / ep experts; everything else is replicated across the EP group.
  - DDP: every rank holds its full (EP-local) copy.
  - FSDP2 (`fully_shard`): every tensor is sharded on dim 0 over its data-parallel group and padded,
    so a rank holds ceil(dim0 / shards) rows. Non-expert tensors shard over all GPUs; EP-local
    expert tensors shard over the GPUs / ep ranks that hold the same experts (as torchtitan does).
    The largest shard (rank 0's) is what we report: memory must fit on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch

from h64lm.model import H64LMForCausalLM
from h64lm.model.config import H64LMConfig
from h64lm.model.moe.experts import Experts

__all__ = ["STRATEGIES", "StateBytes", "meta_model", "muon_parameter_names", "parameter_shapes",
           "state_bytes", "check_layout"]

STRATEGIES = ("ddp", "fsdp")
FP32 = 4  # master weights, gradients and AdamW moments are fp32 in both precisions


def meta_model(config: H64LMConfig) -> H64LMForCausalLM:
    """The real module tree with storage-less parameters."""
    with torch.device("meta"):
        return H64LMForCausalLM(config)


def parameter_shapes(config: H64LMConfig) -> Iterator[Tuple[str, Tuple[int, ...], bool]]:
    """(name, shape, is_expert) of every distinct parameter; a tied head is yielded once."""
    model = meta_model(config)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    for name, p in model.named_parameters():  # named_parameters() already skips a tied duplicate
        yield name, tuple(p.shape), id(p) in expert_ids


def check_layout(config: H64LMConfig, gpus: int, strategy: str, ep: int) -> None:
    """One-line errors for a layout that cannot exist."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    if gpus < 1 or ep < 1:
        raise ValueError(f"gpus={gpus} and ep={ep} must be >= 1")
    if ep > 1 and (gpus % ep or config.num_experts % ep):
        raise ValueError(f"ep={ep} must divide gpus={gpus} and "
                         f"model.num_experts={config.num_experts}")
    if ep > 1 and not config.moe_layer_indices():
        raise ValueError(f"ep={ep} needs MoE layers: model.moe_layers={config.moe_layers!r}")


def _local_numel(shape: Tuple[int, ...], is_expert: bool, gpus: int, strategy: str,
                 ep: int) -> int:
    shape = list(shape)
    if is_expert:
        shape[0] //= ep  # the E / ep experts this rank owns
    if strategy == "fsdp":
        shards = gpus // ep if is_expert else gpus
        shape[0] = math.ceil(shape[0] / shards)  # FSDP2 pads dim 0 to a multiple of the shards
    return math.prod(shape)


@dataclass
class StateBytes:
    """Per-rank bytes that live for the whole run (the largest rank)."""
    params: int  # fp32 master weights (numel * 4)
    grads: int  # fp32 gradients after backward
    optimizer: int  # AdamW: exp_avg + exp_avg_sq (fp32) + a `step` scalar per tensor; Muon: one buffer
    numel: int  # parameters held by this rank
    tensors: int  # parameter tensors (each carries AdamW's step scalar)
    largest_unit: int  # numel of the largest FSDP unit unsharded (a block, or embed+head+norm)
    root_unit: int  # numel of the root unit (embedding, final norm, untied head) unsharded
    unsharded: int  # numel of this rank's EP-local model, unsharded (what FSDP gathers)
    largest_muon: int  # numel of the largest Muon tensor as the step gathers it (EP-local; 0: AdamW)
    largest_matrix: int  # numel of the largest single matrix Muon orthogonalises (one expert's)
    muon_numel: int  # numel of all Muon tensors as gathered: bounds one batched Newton-Schulz call


def muon_parameter_names(config: H64LMConfig) -> set[str]:
    """The parameters `optim=muon` updates with Muon (the trainer's own selection); the rest take AdamW."""
    from h64lm.train.muon import muon_layouts

    model = meta_model(config)
    muon = set(muon_layouts(model, split_fused=True))
    return {name for name, p in model.named_parameters() if p in muon}


def state_bytes(config: H64LMConfig, gpus: int = 1, strategy: str = "ddp",
                ep: int = 1, optim: str = "adamw") -> StateBytes:
    """Parameters, gradients and optimizer state (`optim`: adamw or muon) held by one rank between steps."""
    check_layout(config, gpus, strategy, ep)
    muon = muon_parameter_names(config) if optim == "muon" else set()
    numel = tensors = root = optimizer = largest_muon = largest_matrix = muon_numel = 0
    blocks: dict[str, int] = {}
    for name, shape, is_expert in parameter_shapes(config):
        local_numel = _local_numel(shape, is_expert, gpus, strategy, ep)
        numel += local_numel
        tensors += 1
        if name in muon:  # Muon's momentum buffer
            optimizer += FP32 * local_numel
            gathered = math.prod(shape) // (ep if is_expert else 1)
            largest_muon, muon_numel = max(largest_muon, gathered), muon_numel + gathered
            largest_matrix = max(largest_matrix, math.prod(shape[1:]) if is_expert else math.prod(shape))
        else:  # AdamW's two moments and its step count
            optimizer += 2 * FP32 * local_numel + FP32
        # unsharded (EP-local) size of the FSDP unit the tensor belongs to: one per block + root
        local = math.prod(shape) // (ep if is_expert else 1)
        if name.startswith("layers."):
            block = name.split(".")[1]
            blocks[block] = blocks.get(block, 0) + local
        else:
            root += local
    return StateBytes(params=FP32 * numel, grads=FP32 * numel,
                      optimizer=optimizer, numel=numel, tensors=tensors,
                      largest_unit=max(list(blocks.values()) + [root]), root_unit=root,
                      unsharded=sum(blocks.values()) + root, largest_muon=largest_muon,
                      largest_matrix=largest_matrix, muon_numel=muon_numel)
