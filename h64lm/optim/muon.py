"""Muon (Jordan et al., 2024) for the hidden matrices and AdamW for the rest, as ONE optimizer.

One `torch.optim.Optimizer` keeps the trainer unchanged: one state_dict (checkpoints, exact resume),
one LambdaLR over every group (each group keeps its own peak lr), one GradScaler.

The Muon update is torch.optim.Muon's, step for step (torch/optim/_muon.py, torch >= 2.9):
    B <- mu B + (1 - mu) G                      (lerp form)
    U = (1 - mu) G + mu B  (nesterov) or B
    O = NS5(U)                                   quintic Newton-Schulz on the wide orientation, in bf16
                                                 (`ns_dtype`: fp32 is ~4x faster on a CPU)
    W <- (1 - lr wd) W - adjust(lr, A, B) O      adjust: sqrt(max(1, A/B)) or 0.2 sqrt(max(A, B))
It is applied to each *matrix* of a parameter separately, through views (`matrices`):
- stacked experts [E, in, out] are E matrices: each expert is its own linear map, and one
  orthogonalisation of the [E*in, out] stack would couple their singular values;
- fused projections (W_qkv = [W_q; W_k; W_v], W_gate_up = [W_gate; W_up]) optionally split into
  their maps (`split_fused`, as modded-nanogpt does for Q, K, V): NS of the stack equalises the
  singular values of the concatenated operator, so each block alone gets an update of spectral
  norm below one, and the smaller K/V blocks of GQA get a share set by Q's.
Every matrix is viewed in nn.Linear's [out, in] orientation, so an expert's lr adjustment is the
one a Linear layer of the same shape gets. torch.optim.Muon itself takes whole 2-D parameters only;
tests/optim/test_muon.py checks this update against it matrix by matrix (bit for bit for a matrix
alone; batched, to bf16 rounding).
Matrices of one shape (a layer's experts, the layers' W_o...) go through Newton-Schulz as one
batch: one bmm chain instead of a few hundred small matmuls per step.
Sharded parameters (DTensors): experts split over expert-parallel ranks are whole matrices on
their owner, which updates them without communication; FSDP's shards are gathered within their
group (all ranks for a dense matrix, the ranks holding the same experts for experts), each rank
orthogonalises the whole matrices and keeps its part (the Newton-Schulz work is repeated there).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.optim.adamw import adamw

from h64lm.model.attention import Attention
from h64lm.model.mlp import SwiGLU
from h64lm.model.moe.experts import Experts
from h64lm.parallel.expert_parallel import ExpertParallel  # experts split over ranks, same names

__all__ = ["Matrix", "MuonAdamW", "matrices", "muon_layouts", "newton_schulz", "NS_BATCH_NUMEL", "NS_COEFFICIENTS",
           "NS_DTYPES"]

# Keller Jordan's quintic coefficients (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# `optim.muon_ns_dtype`: bf16 as torch.optim.Muon (tensor cores on GPU); fp32 is ~4x faster on CPUs
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Elements per batched Newton-Schulz call: bounds its workspace (the stacked inputs and ~3 products
# of their size) to ~0.5 GiB in fp32 whatever the model; a larger matrix goes alone.
NS_BATCH_NUMEL = 1 << 25


@dataclass(frozen=True)
class Matrix:
    """How a parameter holds its matrices: `stacked` [E, in, out] (x @ W_e) or nn.Linear's
    [out, in]; `out_splits` the sizes of fused output blocks (None: one block)."""

    stacked: bool = False
    out_splits: Optional[tuple[int, ...]] = None


def matrices(t: Tensor, layout: Matrix) -> list[Tensor]:
    """A parameter, its gradient or its momentum -> views of its matrices, each [out, in]."""
    if layout.stacked:  # [E, in, out]
        splits = layout.out_splits or (t.shape[-1],)
        return [block.T for w_e in t.unbind(0) for block in w_e.split(splits, dim=1)]
    return list(t.split(layout.out_splits, dim=0)) if layout.out_splits else [t]


def muon_layouts(model: nn.Module, split_fused: bool) -> dict[nn.Parameter, Matrix]:
    """The hidden matrices of an H64LM model and their layouts: attention W_qkv and W_o, dense and
    shared SwiGLU, stacked experts. Embeddings, LM head, norms and routers are left to AdamW."""
    layouts: dict[nn.Parameter, Matrix] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            q, kv = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
            layouts[module.qkv_proj.weight] = Matrix(out_splits=(q, kv, kv) if split_fused else None)
            layouts[module.o_proj.weight] = Matrix()
        elif isinstance(module, SwiGLU):
            width = module.down_proj.weight.shape[1]
            layouts[module.gate_up_proj.weight] = Matrix(out_splits=(width, width) if split_fused else None)
            layouts[module.down_proj.weight] = Matrix()
        elif isinstance(module, (Experts, ExpertParallel)):
            width = module.down_proj.shape[1]
            layouts[module.gate_up_proj] = Matrix(True, (width, width) if split_fused else None)
            layouts[module.down_proj] = Matrix(True)
    return {p: m for p, m in layouts.items() if p.requires_grad}


def newton_schulz(G: Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """G [..., A, B] -> ~U V^T of each matrix's SVD in `dtype` (singular values in about [0.5, 1.5]).

    A batch [N, A, B] of same-shape matrices is orthogonalised at once (bmm); each matrix gets the
    result it gets alone up to the matmul kernels' rounding (bmm and mm may sum in other orders)."""
    a, b, c = coefficients
    X = G.to(dtype, copy=True)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.mT
    X.div_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps))  # spectral <= 1
    mm = torch.addmm if X.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = X @ X.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        X = mm(X, poly, X, beta=a)  # a X + (b A + c A^2) X
    return X.mT if tall else X


def _whole_matrices(p: DTensor, U: DTensor, layout: Matrix) -> tuple[Tensor, list[Placement]]:
    """A sharded parameter's update input -> (this rank's whole matrices of it, their placements).
    A split along the expert dim (Shard(0) of stacked experts: expert parallelism) leaves whole
    experts on each rank and is kept; any other split (FSDP's rows, or dim 1 of EP-local experts)
    is gathered, so every rank of that group orthogonalises the same whole matrices."""
    keep = [pl if layout.stacked and isinstance(pl, Shard) and pl.dim == 0 else Replicate() for pl in p.placements]
    return U.redistribute(p.device_mesh, keep).to_local(), keep


def _lr_scale(adjust: str, rows: int, cols: int) -> float:
    if adjust == "match_rms_adamw":  # Moonlight: the update's RMS matches AdamW's (~0.2)
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # Keller Jordan's original


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `use_muon=True` take the Muon update per matrix (layouts from `muon_layouts`),
    the others torch's AdamW (functional, foreach)."""

    def __init__(self, groups: list[dict], layouts: dict[nn.Parameter, Matrix]):
        super().__init__(groups, {})
        self.layouts = layouts
        missing = [p for g in self.param_groups if g["use_muon"] for p in g["params"] if p not in layouts]
        if missing:
            raise ValueError(f"{len(missing)} Muon parameter(s) without a matrix layout")

    def __setstate__(self, state: dict) -> None:
        # load_state_dict lands here: checkpoints written before `ns_dtype` existed ran Newton-Schulz
        # in bf16, and keep doing so (as torch's optimizers default a new hyperparameter)
        super().__setstate__(state)
        for group in self.param_groups:
            if group.get("use_muon"):
                group.setdefault("ns_dtype", "bf16")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["use_muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[tuple[Tensor, Tensor]]] = defaultdict(list)  # -> (W, U)
        gathered: list[tuple[DTensor, Tensor, list[Placement]]] = []  # (parameter, update buffer, its placements)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            B = state["momentum_buffer"]
            B.lerp_(p.grad, 1 - mu)
            U = p.grad.lerp(B, mu) if group["nesterov"] else B
            W = p
            if isinstance(p, DTensor):
                U, held = _whole_matrices(p, U, self.layouts[p])
                W = p.to_local()
                if held != list(p.placements):  # gathered: update the whole matrices, keep this rank's part
                    W = torch.zeros_like(U)
                    gathered.append((p, W, held))
            for W_i, U_i in zip(matrices(W, self.layouts[p]), matrices(U, self.layouts[p])):
                by_shape[U_i.shape].append((W_i, U_i))
        dtype = NS_DTYPES[group["ns_dtype"]]
        for (rows, cols), pairs in by_shape.items():
            scale = lr * _lr_scale(group["adjust_lr"], rows, cols)
            per_batch = max(1, NS_BATCH_NUMEL // (rows * cols))
            for start in range(0, len(pairs), per_batch):
                batch = pairs[start:start + per_batch]
                if len(batch) == 1:  # the 2-D path is torch.optim.Muon's own arithmetic
                    ortho = [newton_schulz(batch[0][1], group["ns_steps"], dtype=dtype)]
                else:
                    ortho = newton_schulz(torch.stack([U_i for _, U_i in batch]), group["ns_steps"],
                                          dtype=dtype).unbind(0)
                for (W_i, _), O_i in zip(batch, ortho):
                    W_i.mul_(1 - lr * wd)
                    W_i.add_(O_i, alpha=-scale)
        for p, update, held in gathered:  # update = -scale O per matrix; re-sharding it is a local slice
            local = DTensor.from_local(update, p.device_mesh, held, run_check=False)
            p.to_local().mul_(1 - lr * wd).add_(local.redistribute(p.device_mesh, p.placements).to_local())

    def _adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW (foreach, not capturable): the step count on the host
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            # DTensors beside plain tensors (DDP + expert parallelism): foreach kernels refuse the mix
            foreach = len({isinstance(p, DTensor) for p in params}) == 1
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, amsgrad=False,
                  beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False)
