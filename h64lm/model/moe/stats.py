"""Routing you can see: per-MoE-layer diagnostics as pure functions, one snapshot the trainer takes
at each evaluation, and a load heatmap over training.

Snapshot metrics per MoE layer (on fixed evaluation windows, in eval() mode, so the drop share is
that of `model.eval_capacity_factor`; training drops are in the training records):
  load_max_over_mean  max_i c_i / mean_i c_i (1 = even, E = everything on one expert)
  load_entropy        entropy of the load distribution c / sum(c), in nats (log E = even)
  router_entropy      mean over tokens of the entropy of the routing distribution, in nats
  top1_changed        share of tokens whose top-1 expert differs from the previous snapshot's
  dropped             share of assignments over capacity
  bias                the aux-loss-free selection bias [E] (only when it is on)
"""

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from h64lm.plotting import LOAD_RATIO_CMAP, clip_load_ratio, load_ratio_colorbar, load_ratio_norm

from .balance import moe_layers

__all__ = ["load_max_over_mean", "load_entropy", "router_entropy", "top1_changed",
           "routing_snapshot", "load_matrix", "plot_load_heatmap"]


def load_max_over_mean(counts: torch.Tensor) -> float:
    """counts [E] -> max / mean."""
    counts = counts.float()
    return (counts.max() / counts.mean().clamp(min=1e-12)).item()


def load_entropy(counts: torch.Tensor) -> float:
    """counts [E] -> entropy of counts / sum(counts) in nats (0 * log 0 = 0)."""
    p = counts.float() / counts.float().sum().clamp(min=1e-12)
    return -(p * p.clamp(min=1e-30).log()).sum().item()


def router_entropy(probs: torch.Tensor) -> float:
    """probs [N, E] routing distributions -> mean over tokens of their entropy, nats."""
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1).mean().item()


def top1_changed(previous: torch.Tensor, current: torch.Tensor) -> float:
    """top-1 expert ids [N] of two snapshots on the same tokens -> share that changed."""
    if previous.shape != current.shape:
        raise ValueError(f"top-1 snapshots of {tuple(previous.shape)} and {tuple(current.shape)} "
                         "tokens: pass the same evaluation windows to every routing_snapshot")
    return (previous != current).float().mean().item()


@torch.no_grad()
def routing_snapshot(model: nn.Module, windows: Sequence[torch.Tensor],
                     previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the fixed evaluation windows (input_ids [B, T] each) through the model in eval mode.

    -> {"layers": {"<i>": {metric: number or list}}, "top1": {i: [N] long}}. Log "layers"; keep
    the whole dict and pass it as `previous` next time for "top1_changed"."""
    layers = moe_layers(model)
    seen: Dict[int, List[Any]] = {i: [] for i in layers}
    hooks = [layer.router.register_forward_hook(
        lambda m, args, routing, i=i: seen[i].append(routing)) for i, layer in layers.items()]
    was_training = model.training
    model.eval()
    counts: Dict[int, torch.Tensor] = {}
    dropped: Dict[int, List[float]] = {i: [] for i in layers}
    try:
        for input_ids in windows:
            for r in model(input_ids, return_logits=False).router:
                counts[r["layer"]] = counts.get(r["layer"], 0) + r["counts"].float()
                dropped[r["layer"]].append(r["dropped"].item())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: Dict[str, Any] = {"layers": {}, "top1": {}}
    for i, layer in layers.items():
        probs = torch.cat([r.probs for r in seen[i]])  # [N, E]
        top1 = torch.cat([r.experts[:, 0] for r in seen[i]])  # [N]
        metrics = {
            "load": (counts[i] / counts[i].sum()).tolist(),
            "load_max_over_mean": load_max_over_mean(counts[i]),
            "load_entropy": load_entropy(counts[i]),
            "router_entropy": router_entropy(probs),
            "dropped": sum(dropped[i]) / len(dropped[i]),
        }
        if previous is not None and i in previous["top1"]:
            metrics["top1_changed"] = top1_changed(previous["top1"][i], top1)
        if layer.router.bias is not None:
            metrics["bias"] = layer.router.bias.tolist()
        out["layers"][str(i)] = metrics
        out["top1"][i] = top1
    return out


def load_matrix(records: Sequence[Dict[str, Any]]):
    """Training records ({"step", "router": {"<layer>": {"load": [E]}}}) -> (steps, row labels,
    ratio [layers * E, steps] of load / mean load)."""
    import numpy as np

    routed = [r for r in records if r.get("router")]
    if not routed:
        raise ValueError("no records with per-layer router loads to plot")
    layers = sorted(routed[-1]["router"], key=int)
    rows, labels = [], []
    for layer in layers:
        load = np.array([r["router"][layer]["load"] for r in routed], dtype=float)  # [steps, E]
        ratio = load / load.mean(axis=1, keepdims=True)
        rows.append(ratio.T)
        labels += [f"L{layer} e{e}" for e in range(load.shape[1])]
    return [r["step"] for r in routed], labels, np.concatenate(rows)


def plot_load_heatmap(records: Sequence[Dict[str, Any]], path) -> None:
    """Load per (layer, expert) over training steps, coloured by load / mean on the colour scale
    the sweep report uses too (h64lm/plotting.py: log scale centred at 1x, 1/8x..8x): overloaded
    red, starved blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, labels, ratio = load_matrix(records)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.18 * len(labels)))
    im = ax.imshow(clip_load_ratio(ratio), aspect="auto", origin="lower", cmap=LOAD_RATIO_CMAP,
                   norm=load_ratio_norm(), interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(labels) - 0.5))
    load_ratio_colorbar(fig, im, ax)
    ax.set(xlabel="step", yticks=range(len(labels)), title="expert load by layer")
    ax.set_yticklabels(labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
