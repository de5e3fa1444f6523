"""The sweep report's figures. Every line plotted comes from `run_curves` (stored in report.json
too) and every heat map from `expert_load_ratios`, so the figures can be checked against numbers.

Expert load is drawn as load / mean load (1 = balanced) on the fixed log colour scale of
`h64lm.plotting` (centred at 1, 1/8x..8x), the one the trainer's per-run `expert_load.png` uses:
the same colour is the same load in every figure of every run.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from experiments.report_arms import Arm
from experiments.report_runs import RunInfo
from experiments.report_series import (
    BALANCE_TAIL,
    EMA_BETA,
    expert_load_ratios,
    router_tail_mean,
)
from h64lm.plotting import LOAD_RATIO_CMAP, clip_load_ratio, load_ratio_colorbar, load_ratio_norm

__all__ = [
    "file_stem",
    "plot_expert_balance",
    "plot_expert_load_steps",
    "plot_loss_vs_imbalance",
    "plot_losses",
    "plot_val_loss_against",
]

Curves = dict[str, list[float] | None]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_losses(labels: list[str], curves: list[Curves], path: Path) -> Path:
    """Two panels against training tokens: the smoothed training loss (raw loss faint behind it)
    and the validation loss. `labels` and `curves` are parallel, one per run."""
    plt = _plt()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for i, (label, c) in enumerate(zip(labels, curves)):
        colour = f"C{i % 10}"
        ax_train.plot(c["train_tokens"], c["train_loss"], color=colour, lw=0.5, alpha=0.25)
        ax_train.plot(c["train_tokens"], c["train_loss_ema"], color=colour, lw=1.2, label=label)
        if c["val_loss"]:
            ax_val.plot(c["val_tokens"], c["val_loss"], "o-", color=colour, ms=3, label=label)
    ax_train.set(xlabel="training tokens", ylabel="loss (nats/token)",
                 title=f"training loss (EMA, beta={EMA_BETA} over logged steps; raw faint)")
    ax_val.set(xlabel="training tokens", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    return _save(fig, path)


def plot_val_loss_against(labels: list[str], curves: list[Curves], x: str, path: Path
                          ) -> Path | None:
    """Validation loss against `x` = "flops" (training PFLOP, active) or "seconds" (training
    time); None when no run has that axis."""
    key, scale, xlabel = {
        "flops": ("val_flops", 1e15, "training compute (PFLOP, active parameters)"),
        "seconds": ("val_seconds", 1.0, "training time (s, evaluation excluded)"),
    }[x]
    drawn = [(label, c) for label, c in zip(labels, curves) if c[key] and c["val_loss"]]
    if not drawn:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, c in drawn:
        ax.plot([v / scale for v in c[key]], c["val_loss"], "o-", ms=3, label=label)
    ax.set(xlabel=xlabel, ylabel="validation loss (nats/token)",
           title=f"validation loss at equal {'compute' if x == 'flops' else 'time'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _tail_ratio(ratios: list[list[list[float]]]) -> list[list[float]]:
    """[layer][expert]: the mean ratio over the last BALANCE_TAIL of steps."""
    out = []
    for per_step in ratios:
        tail = per_step[-max(1, math.ceil(len(per_step) * BALANCE_TAIL)):]
        out.append([statistics.fmean(step[e] for step in tail) for e in range(len(tail[0]))])
    return out


def plot_expert_balance(runs: list[RunInfo], labels: list[str], path: Path) -> Path | None:
    """One panel per MoE run (rows: MoE layers, columns: experts): load / mean load over the last
    BALANCE_TAIL of logged steps. None if no run routes."""
    tables = []
    for run, label in zip(runs, labels):
        layers, _, ratios = expert_load_ratios(run.records)
        if layers:
            max_over_mean = router_tail_mean(run.records, "load_max_over_mean") or math.nan
            tables.append((label, layers, _tail_ratio(ratios), max_over_mean))
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(tables), 1, squeeze=False,
                             figsize=(8, 1.2 + 1.6 * sum(len(t[1]) for t in tables)))
    for ax, (label, layers, table, max_over_mean) in zip(axes[:, 0], tables):
        im = ax.imshow(clip_load_ratio(table), aspect="auto", cmap=LOAD_RATIO_CMAP,
                       norm=load_ratio_norm())
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_xticks(range(len(table[0])))
        ax.set_title(f"{label}  (max/mean {max_over_mean:.2f}, as in the table)", fontsize=8)
        load_ratio_colorbar(fig, im, ax)
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle(f"expert load / mean load, last {BALANCE_TAIL:.0%} of logged steps")
    return _save(fig, path)


def plot_expert_load_steps(run: RunInfo, label: str, path: Path) -> Path | None:
    """One heat map per MoE layer of the run: expert (rows) by logged step (columns), coloured by
    load / mean load. None if the run logged no expert loads."""
    layers, steps, ratios = expert_load_ratios(run.records)
    if not layers:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, axes = plt.subplots(len(layers), 1, squeeze=False, figsize=(9, 0.6 + 2.4 * len(layers)))
    for ax, layer, per_step in zip(axes[:, 0], layers, ratios):
        n_experts = len(per_step[0])
        by_expert = [[step[e] for step in per_step] for e in range(n_experts)]  # [E, steps]
        im = ax.imshow(clip_load_ratio(by_expert), aspect="auto", origin="lower",
                       cmap=LOAD_RATIO_CMAP, norm=load_ratio_norm(), interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_experts - 0.5))
        ax.set(ylabel="expert", title=f"MoE layer {layer}", yticks=range(n_experts))
        load_ratio_colorbar(fig, im, ax)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{label}: expert load / mean load over training", fontsize=9)
    return _save(fig, path)


def plot_loss_vs_imbalance(arms: list[Arm], rows: list[dict[str, Any]], path: Path
                           ) -> Path | None:
    """The trade-off: final validation loss against expert load max/mean, one small point per
    finished run, coloured by arm, and each arm's mean as a large marker with its seed standard
    deviation as error bars. None when no run has both numbers (a dense sweep)."""
    by_name = {row["run"]: row for row in rows}
    drawn = []
    for arm in arms:
        points = [(by_name[n]["load_max_over_mean"], by_name[n]["final_val_loss"]) for n in arm.runs]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            drawn.append((arm, points))
    if not drawn:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (arm, points) in enumerate(drawn):
        colour = f"C{i % 10}"
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=18, color=colour, alpha=0.6)
        sx, sy = statistics.fmean(xs), statistics.fmean(ys)
        ex = statistics.stdev(xs) if len(xs) > 1 else 0.0
        ey = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar([sx], [sy], xerr=[ex], yerr=[ey], fmt="D", ms=8, color=colour, mec="black",
                    capsize=3, label=f"{arm.label} (n={len(points)})")
    ax.set(xlabel="expert load max/mean (1 = even; mean over MoE layers, last "
                  f"{BALANCE_TAIL:.0%} of steps)",
           ylabel="final validation loss (nats/token)",
           title="loss against imbalance: runs (dots), arm means ± seed std (diamonds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def file_stem(name: str) -> str:
    """A run's table name ("sweep/3") as a file name ("sweep_3")."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "run"
