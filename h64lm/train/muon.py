"""Muon (Jordan et al., 2024) for the hidden matrices and AdamW for the rest, as ONE optimizer.

One `torch.optim.Optimizer` keeps the trainer unchanged: one state_dict (checkpoints, exact resume),
one LambdaLR over every group (each group keeps its own peak lr), one GradScaler.

The Muon update is torch.optim.Muon's, step for step (torch/optim/_muon.py, torch >= 2.9):
    B <- mu B + (1 - mu) G                      (lerp form)
    U = (1 - mu) G + mu B  (nesterov) or B
    O = NS5(U)                                   quintic Newton-Schulz in bf16 on the wide orientation
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
tests/train/test_muon.py checks this update against it matrix by matrix, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

__all__ = ["Matrix", "MuonAdamW", "matrices", "muon_layouts", "newton_schulz", "NS_COEFFICIENTS"]

# Keller Jordan's quintic coefficients (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


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
    from h64lm.model.attention import Attention
    from h64lm.model.mlp import SwiGLU
    from h64lm.model.moe.experts import Experts

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
        elif isinstance(module, Experts):
            width = module.down_proj.shape[1]
            layouts[module.gate_up_proj] = Matrix(True, (width, width) if split_fused else None)
            layouts[module.down_proj] = Matrix(True)
    return {p: m for p, m in layouts.items() if p.requires_grad}


def newton_schulz(G: Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> Tensor:
    """G [A, B] -> ~U V^T of G's SVD, in bf16 (singular values land in about [0.5, 1.5])."""
    a, b, c = coefficients
    X = G.to(torch.bfloat16, copy=True)
    tall = G.size(0) > G.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.T
    X.div_(X.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = X @ X.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, poly, X, beta=a)  # a X + (b A + c A^2) X
    return X.T if tall else X


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
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            layout = self.layouts[p]
            for W, G, B in zip(matrices(p, layout), matrices(p.grad, layout),
                               matrices(state["momentum_buffer"], layout)):
                B.lerp_(G, 1 - mu)
                U = G.lerp(B, mu) if group["nesterov"] else B
                ortho = newton_schulz(U, group["ns_steps"])
                W.mul_(1 - lr * wd)
                W.add_(ortho, alpha=-lr * _lr_scale(group["adjust_lr"], *W.shape))

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
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, amsgrad=False,
                  beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False)
