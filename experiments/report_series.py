"""Per-run series and summaries drawn from `metrics.jsonl`: smoothed training loss, validation
loss against tokens / training FLOPs / training seconds, expert load, routing statistics and
downstream scores.

Everything here takes plain records (one dict per logged step), so it is the same whether a run
finished or not.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = [
    "BALANCE_TAIL",
    "EMA_BETA",
    "ROUTER_SUMMARY_STATS",
    "downstream_accuracy",
    "ema",
    "expert_load_ratios",
    "final_sft_numbers",
    "run_curves",
    "router_layers",
    "router_tail_mean",
    "train_loss_curve",
    "train_seconds",
]

# Expert balance and dropped share are averaged over this final fraction of the logged steps:
# early steps reflect the random router, not what training settles on.
BALANCE_TAIL = 0.25

# Training loss is smoothed with a bias-corrected exponential moving average of this factor over
# the logged steps (0.9: about the last 10 logged steps weigh most).
EMA_BETA = 0.9

# Per-layer router statistics summarised in a column when the records carry them
# (stat name -> column header): mean over MoE layers and the last BALANCE_TAIL of steps.
ROUTER_SUMMARY_STATS = {"entropy": "router entropy", "top1_changed": "top-1 changed"}


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected EMA: m_t = beta m_{t-1} + (1 - beta) x_t, reported as m_t / (1 - beta^t)
    (Adam's correction), so the first points are not pulled toward 0."""
    m, out = 0.0, []
    for t, x in enumerate(values, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**t))
    return out


def train_loss_curve(records: list[dict[str, Any]], beta: float = EMA_BETA
                     ) -> tuple[list[int], list[float], list[float]]:
    """(tokens, raw loss, EMA-smoothed loss) over the logged steps with a finite loss (a NaN step
    was skipped by the optimizer and would poison the average)."""
    kept = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    raw = [r["loss"] for r in kept]
    return [r["tokens"] for r in kept], raw, ema(raw, beta)


def train_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Cumulative training seconds at each record (evaluation and checkpoint time excluded).

    A record holds the time of its own step only (`step_time_s`, else tokens / tokens_per_s); with
    `train.log_every` > 1 the steps between two records are taken to have taken as long."""
    total, previous_step, previous_tokens, out = 0.0, 0, 0, []
    for r in records:
        if "step_time_s" in r:
            total += r["step_time_s"] * (r["step"] - previous_step)
        elif r.get("tokens_per_s"):
            total += (r["tokens"] - previous_tokens) / r["tokens_per_s"]
        previous_step, previous_tokens = r["step"], r["tokens"]
        out.append(total)
    return out


def router_layers(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per MoE layer (id as a string), its router statistics. Reads both the nested form the
    trainer writes (`{"router": {"1": {"load": [...]}}}`) and flat keys (`"router.1.entropy"`),
    as a W&B-style flattened record would hold them."""
    layers = {k: dict(v) for k, v in (record.get("router") or {}).items()}
    # evaluation steps also carry the routing snapshot (`routing`): its statistics join the
    # training ones without replacing them (the training load stays the training load)
    for layer, stats in (record.get("routing") or {}).items():
        for name, value in stats.items():
            layers.setdefault(layer, {}).setdefault("entropy" if name == "router_entropy" else name, value)
    for key, value in record.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "router" and parts[1].isdigit():
            layers.setdefault(parts[1], {})[parts[2]] = value
    return layers


def router_tail_mean(records: list[dict[str, Any]], stat: str) -> float | None:
    """`stat` averaged over MoE layers and the last BALANCE_TAIL of the records that carry it."""
    values = [[v[stat] for v in router_layers(r).values() if stat in v] for r in records]
    values = [v for v in values if v]
    if not values:
        return None
    tail = values[-max(1, math.ceil(len(values) * BALANCE_TAIL)):]
    return statistics.fmean(x for step in tail for x in step)


def downstream_accuracy(records: list[dict[str, Any]]) -> dict[str, float]:
    """task -> the last logged `downstream/<task>/acc`."""
    out: dict[str, float] = {}
    for r in records:
        for key, value in r.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "downstream" and parts[2] == "acc":
                out[parts[1]] = value
    return out


def final_sft_numbers(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """What the SFT stage did, at the last evaluation that logged it (None where no record did):
    `final_exact_match`, the last `sft/exact_match` (held-out test problems answered greedily),
    and `final_top1_changed_from_start`, the share of tokens whose top-1 expert differs from the
    starting model's (`routing.<layer>.top1_changed_from_start`), averaged over MoE layers."""
    exact = [r["sft/exact_match"] for r in records if r.get("sft/exact_match") is not None]
    changed = [[stats["top1_changed_from_start"] for stats in (r.get("routing") or {}).values()
                if "top1_changed_from_start" in stats] for r in records]
    changed = [layers for layers in changed if layers]
    return {"final_exact_match": exact[-1] if exact else None,
            "final_top1_changed_from_start": statistics.fmean(changed[-1]) if changed else None}


def expert_load_ratios(records: list[dict[str, Any]]
                       ) -> tuple[list[str], list[int], list[list[list[float]]]]:
    """(MoE layer ids, steps, ratio[layer][step][expert]) with ratio = an expert's load / the
    layer's mean load at that step (1 = balanced), over the records that carry expert loads."""
    routed = [(r["step"], router_layers(r)) for r in records]
    routed = [(step, layers) for step, layers in routed
              if layers and all("load" in v for v in layers.values())]
    if not routed:
        return [], [], []
    layers = sorted(routed[-1][1], key=int)
    routed = [(step, ls) for step, ls in routed if all(layer in ls for layer in layers)]
    ratios = []
    for layer in layers:
        per_step = []
        for _, ls in routed:
            load = ls[layer]["load"]
            mean = statistics.fmean(load)
            per_step.append([x / mean if mean > 0 else math.nan for x in load])
        ratios.append(per_step)
    return layers, [step for step, _ in routed], ratios


def run_curves(records: list[dict[str, Any]], flops_per_token: float | None,
               beta: float = EMA_BETA) -> dict[str, list[float] | None]:
    """Every series the report plots for one run (and stores in report.json)."""
    tokens, raw, smooth = train_loss_curve(records, beta)
    evals = [(r, s) for r, s in zip(records, train_seconds(records)) if "val_loss" in r]
    val_tokens = [r["tokens"] for r, _ in evals]
    return {
        "train_tokens": tokens, "train_loss": raw, "train_loss_ema": smooth,
        "val_tokens": val_tokens,
        # training FLOPs (active) so far at each evaluation; None without a model config
        "val_flops": [flops_per_token * n for n in val_tokens] if flops_per_token else None,
        "val_seconds": [s for _, s in evals],  # cumulative training seconds
        "val_loss": [r["val_loss"] for r, _ in evals],
    }
