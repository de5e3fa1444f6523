"""Per-rank bytes of parameters, gradients and optimizer state (AdamW, or Muon + AdamW), counted
tensor by tensor from the real module structure.

Every dense block has the same parameters, and so has every MoE block: a `meta`-device model
(storage-less) with one block of each kind present gives each tensor once, and each block
tensor counts as many times as the model has blocks of its kind. A 7B model, or one with
20,000 layers, costs no memory and no time proportional to its depth.

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

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch

from h64lm.model import H64LMForCausalLM
from h64lm.model.config import H64LMConfig
from h64lm.model.moe.experts import Experts
from h64lm.optim.muon import muon_layouts

__all__ = ["STRATEGIES", "StateBytes", "ParameterKind", "parameter_kinds", "parameter_shapes",
           "state_bytes", "check_layout"]

STRATEGIES = ("ddp", "fsdp")
FP32 = 4  # master weights, gradients and AdamW moments are fp32 in both precisions
ROOT, DENSE, SPARSE = "root", "dense", "moe"  # the FSDP unit a tensor belongs to


@dataclass(frozen=True)
class ParameterKind:
    """One parameter tensor of the model, or one of every block of a kind (`count` of them)."""
    name: str  # its name in the model; in a block, relative to the block ("attn.qkv_proj.weight")
    shape: Tuple[int, ...]
    is_expert: bool  # a stacked [E, ...] expert tensor (split by expert parallelism)
    is_muon: bool  # updated by Muon under optim=muon (the trainer's own selection); else AdamW
    unit: str  # ROOT, DENSE or SPARSE
    count: int  # tensors of this kind in the model


def _template(config: H64LMConfig) -> Tuple[H64LMConfig, dict]:
    """A config with at most one dense and one MoE block (same widths), and {template layer
    index: block kind}."""
    sparse = len(config.moe_layer_indices())
    kinds = [DENSE] * (sparse < config.num_layers) + [SPARSE] * (sparse > 0)
    small = dataclasses.replace(config, num_layers=len(kinds),
                                moe_layers=[i for i, k in enumerate(kinds) if k == SPARSE])
    return small, dict(enumerate(kinds))


def parameter_kinds(config: H64LMConfig) -> List[ParameterKind]:
    """Every distinct parameter tensor of the model, block tensors once per block kind; a tied
    head is counted once. (Memoised: a plan asks for the same model once per layout.)"""
    key = repr(config)
    if key not in _KINDS:
        _KINDS.clear()  # one model at a time is what a plan needs
        _KINDS[key] = _parameter_kinds(config)
    return _KINDS[key]


_KINDS: dict[str, List[ParameterKind]] = {}


def _parameter_kinds(config: H64LMConfig) -> List[ParameterKind]:
    small, block_kind = _template(config)
    sparse = len(config.moe_layer_indices())
    per_kind = {DENSE: config.num_layers - sparse, SPARSE: sparse, ROOT: 1}
    with torch.device("meta"):
        model = H64LMForCausalLM(small)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    muon_ids = {id(p) for p in muon_layouts(model, split_fused=True)}
    kinds = []
    for name, p in model.named_parameters():  # named_parameters() already skips a tied duplicate
        unit = ROOT
        if name.startswith("layers."):
            _, index, name = name.split(".", 2)
            unit = block_kind[int(index)]
        kinds.append(ParameterKind(name, tuple(p.shape), id(p) in expert_ids, id(p) in muon_ids, unit,
                                   per_kind[unit]))
    return kinds


def parameter_shapes(config: H64LMConfig) -> Iterator[Tuple[str, Tuple[int, ...], bool]]:
    """(name, shape, is_expert) of every distinct parameter, layer by layer (one item per tensor:
    use `parameter_kinds` to count a deep model)."""
    kinds = parameter_kinds(config)
    sparse = set(config.moe_layer_indices())
    for k in kinds:
        if k.unit == ROOT:
            yield k.name, k.shape, k.is_expert
    for i in range(config.num_layers):
        for k in kinds:
            if k.unit == (SPARSE if i in sparse else DENSE):
                yield f"layers.{i}.{k.name}", k.shape, k.is_expert


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


def state_bytes(config: H64LMConfig, gpus: int = 1, strategy: str = "ddp",
                ep: int = 1, optim: str = "adamw") -> StateBytes:
    """Parameters, gradients and optimizer state (`optim`: adamw or muon) held by one rank between steps."""
    check_layout(config, gpus, strategy, ep)
    numel = tensors = optimizer = largest_muon = largest_matrix = muon_numel = 0
    units = {ROOT: 0, DENSE: 0, SPARSE: 0}  # unsharded (EP-local) numel of one FSDP unit of each kind
    for k in parameter_kinds(config):
        local_numel = _local_numel(k.shape, k.is_expert, gpus, strategy, ep)
        numel += k.count * local_numel
        tensors += k.count
        gathered = math.prod(k.shape) // (ep if k.is_expert else 1)
        if k.is_muon and optim == "muon":  # Muon's momentum buffer
            optimizer += k.count * FP32 * local_numel
            largest_muon, muon_numel = max(largest_muon, gathered), muon_numel + k.count * gathered
            largest_matrix = max(largest_matrix, math.prod(k.shape[1:]) if k.is_expert else math.prod(k.shape))
        else:  # AdamW's two moments and its step count
            optimizer += k.count * (2 * FP32 * local_numel + FP32)
        units[k.unit] += gathered
    sparse = len(config.moe_layer_indices())
    blocks = [units[DENSE]] * (sparse < config.num_layers) + [units[SPARSE]] * (sparse > 0)
    return StateBytes(params=FP32 * numel, grads=FP32 * numel,
                      optimizer=optimizer, numel=numel, tensors=tensors,
                      largest_unit=max(blocks + [units[ROOT]]), root_unit=units[ROOT],
                      unsharded=units[DENSE] * (config.num_layers - sparse) + units[SPARSE] * sparse
                      + units[ROOT], largest_muon=largest_muon,
                      largest_matrix=largest_matrix, muon_numel=muon_numel)
