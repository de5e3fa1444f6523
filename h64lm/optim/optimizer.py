"""AdamW with decoupled weight decay on matrices only (or Muon + AdamW), and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from h64lm.config import OptimConfig
from h64lm.optim.muon import MuonAdamW, muon_layouts

__all__ = ["build_muon", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset = frozenset()) -> list[dict]:
    """Decay weight matrices; leave norms, biases and embedding tables undecayed.

    Embeddings are excluded because decay pulls rare tokens' rows to zero (they rarely get a
    gradient to push back). A tied LM head shares the embedding's tensor and follows it.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen or id(p) in exclude:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        return build_muon(model, cfg, device)
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if len({isinstance(p, DTensor) for p in model.parameters()}) > 1:
        # DDP + expert parallelism: DTensor experts beside plain tensors, which the fused and
        # foreach kernels refuse to mix in one call; one update per tensor instead.
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    try:
        # One fused kernel per step instead of a chain of per-tensor ops.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_muon(model: nn.Module, cfg: OptimConfig, device: torch.device) -> MuonAdamW:
    """Muon group first (peak lr `muon_lr`), then the AdamW groups of everything else."""
    layouts = muon_layouts(model, cfg.muon_split_fused)
    ns_dtype = cfg.muon_ns_dtype if cfg.muon_ns_dtype != "auto" else "bf16" if device.type == "cuda" else "fp32"
    muon = dict(params=list(layouts), use_muon=True, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                adjust_lr=cfg.muon_adjust_lr, ns_dtype=ns_dtype)
    rest = [dict(g, use_muon=False, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            for g in param_groups(model, cfg.weight_decay, frozenset(map(id, layouts)))]
    return MuonAdamW([g for g in [muon, *rest] if g["params"]], layouts)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    horizon = cfg.schedule_steps or max_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, horizon))
