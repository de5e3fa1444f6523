"""Layouts (strategy x EP degree x activation checkpointing) of one training job, their per-GPU
memory, tokens, FLOPs and time per step, and the cheapest layout that fits a GPU.

Per-GPU memory = state (fp32 params, grads, AdamW moments or Muon's momentum; params.py)
               + buffers: DDP keeps a gradient-sized bucket copy (PyTorch's default
                 gradient_as_bucket_view=False); bf16 DDP keeps autocast's bf16 copy of every
                 matrix weight through forward; FSDP2 holds two units unsharded in the compute
                 dtype (the running block and the prefetched one) plus the root unit
                 (embedding, head, final norm) and one unit's unsharded fp32 gradients
               + with Muon, the optimizer step's workspace (an estimate, not measured): the
                 Newton-Schulz batch and ~3 products of its size in fp32, and under FSDP the
                 largest Muon matrix gathered whole with its update
               + activations of one micro-batch (activations.py; with checkpointing one block's
                 recomputed tensors on top) + the cross-entropy's [256, V] fp32 chunk twice
It fits when that is <= gpu_mem * (1 - headroom): the headroom covers the CUDA context, NCCL
buffers, allocator fragmentation and uneven routing.

Time per step = executed FLOPs / (gpus * peak * mfu), with executed = model FLOPs (6N + attention,
h64lm/model/flops.py, active experts only) x 4/3 under checkpointing (the blocks' forward runs
twice); `mfu` is the fraction of peak the job reaches on what it executes. Communication is
reported (bytes per GPU per step), assumed overlapped, and breaks ties between equal times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from h64lm.model.config import H64LMConfig
from h64lm.model.flops import flops_per_token
from h64lm.optim.muon import NS_BATCH_NUMEL
from h64lm.parallel.layout import ParallelLayout

from .activations import PRECISIONS, activation_bytes
from .params import state_bytes

__all__ = ["Layout", "plan_layout", "plan_layouts", "recommend", "DEFAULT_HEADROOM"]

DEFAULT_HEADROOM = 0.10
CE_CHUNK = 256  # h64lm/model/loss.py CHUNK_TOKENS
RECOMPUTE = 4 / 3  # forward (1/3 of fwd+bwd) repeated for every checkpointed block


@dataclass
class Layout:
    strategy: str  # ddp | fsdp
    ep: int  # expert-parallel degree
    checkpointing: bool
    gpus: int
    params: int  # bytes per GPU, fp32 master weights
    grads: int
    optimizer: int
    buffers: int  # DDP bucket / autocast copies / FSDP unsharded units
    activations: int  # saved + recomputed block + cross-entropy chunk
    tokens_per_step: int
    flops_per_step: float  # model FLOPs (no recompute)
    time_s: Optional[float]  # None without peak/mfu
    comm_bytes: float  # sent per GPU per step (ring collectives, all-to-all)
    fits: Optional[bool] = None  # None without a GPU memory size

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    @property
    def name(self) -> str:
        return f"{self.strategy} ep={self.ep} ckpt={'on' if self.checkpointing else 'off'}"


def plan_layout(config: H64LMConfig, *, seq_len: int, micro_batch: int, grad_accum: int = 1,
                gpus: int = 1, strategy: str = "ddp", ep: int = 1, precision: str = "bf16", optim: str = "adamw",
                checkpointing: bool = False, peak_tflops: Optional[float] = None,
                mfu: Optional[float] = None, gpu_mem_gb: Optional[float] = None,
                headroom: float = DEFAULT_HEADROOM) -> Layout:
    """Per-GPU bytes, tokens, FLOPs and time of one optimizer step for one layout."""
    ParallelLayout(gpus, strategy, ep, config.num_experts, bool(config.moe_layer_indices()))
    for key, value in (("seq_len", seq_len), ("micro_batch", micro_batch),
                       ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom} must be in [0, 1)")
    state = state_bytes(config, gpus, strategy, ep, optim)
    a = PRECISIONS[precision]
    if strategy == "ddp":
        buffers = state.grads if gpus > 1 else 0  # the reducer's bucket copy of the gradients
        if a != 4:  # autocast caches a bf16 copy of each matrix weight until forward ends
            buffers += a * (state.numel - state.root_unit)
    else:
        buffers = a * (2 * state.largest_unit + state.root_unit) + 4 * state.largest_unit
    if optim == "muon":  # one Newton-Schulz call: its stacked input and ~3 products of that size
        buffers += 4 * 4 * max(state.largest_matrix, min(NS_BATCH_NUMEL, state.muon_numel))
        if strategy == "fsdp":  # the largest tensor gathered whole, and its update
            buffers += 2 * 4 * state.largest_muon
    act = activation_bytes(config, micro_batch, seq_len, precision, checkpointing)
    activations = act.peak + 2 * 4 * CE_CHUNK * config.vocab_size

    tokens = micro_batch * seq_len * grad_accum * gpus
    flops = flops_per_token(config, seq_len) * tokens
    time_s = None
    if peak_tflops and mfu:
        executed = flops * (RECOMPUTE if checkpointing else 1.0)
        time_s = executed / (gpus * peak_tflops * 1e12 * mfu)
    layout = Layout(strategy, ep, checkpointing, gpus, state.params, state.grads, state.optimizer,
                    buffers, activations, tokens, flops, time_s,
                    _comm_bytes(config, state, gpus, strategy, ep, a, micro_batch * seq_len,
                                grad_accum, checkpointing))
    if gpu_mem_gb is not None:
        layout.fits = layout.total <= gpu_mem_gb * 1e9 * (1 - headroom)
    return layout


def _comm_bytes(config, state, gpus, strategy, ep, a, tokens, accum, checkpointing) -> float:
    """Bytes one GPU sends per step: ring all-reduce 2(g-1)/g x size, all-gather and
    reduce-scatter (g-1)/g x the unsharded size, all-to-all (ep-1)/ep of the rows."""
    if gpus == 1:
        return 0.0
    if strategy == "ddp":
        volume = 2 * (gpus - 1) / gpus * state.grads  # once per step (no_sync while accumulating)
    else:
        # per micro-batch: gather for forward, again for backward, reduce-scatter the grads
        # (expert tensors really gather over gpus / ep ranks: (g-1)/g slightly overstates them)
        volume = accum * (gpus - 1) / gpus * state.unsharded * (2 * a + 4)
    if ep > 1:
        rows = tokens * config.num_experts_per_token * config.hidden_size * a
        passes = 6 if checkpointing else 4  # dispatch + combine, forward and backward
        volume += accum * len(config.moe_layer_indices()) * passes * rows * (ep - 1) / ep
    return volume


def plan_layouts(config: H64LMConfig, *, gpus: int, **kwargs) -> List[Layout]:
    """Every layout for `gpus` GPUs, cheapest first: those that fit (when gpu_mem_gb is given),
    then by time per step, communication, memory. FSDP and EP only with several GPUs; EP degrees
    are the divisors of both the GPU count and the expert count."""
    strategies = ["ddp", "fsdp"] if gpus > 1 else ["ddp"]
    eps = [1]
    if gpus > 1 and config.moe_layer_indices():
        eps += [e for e in range(2, gpus + 1) if gpus % e == 0 and config.num_experts % e == 0]
    layouts = [plan_layout(config, gpus=gpus, strategy=s, ep=e, checkpointing=ck, **kwargs)
               for s in strategies for e in eps for ck in (False, True)]
    return sorted(layouts, key=lambda x: (x.fits is False, x.time_s or 0.0, x.comm_bytes,
                                          x.total))


def recommend(layouts: List[Layout]) -> Optional[Layout]:
    """The cheapest layout that fits, or None when none does."""
    fitting = [x for x in layouts if x.fits]
    return fitting[0] if fitting else None
