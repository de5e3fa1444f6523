"""Compare the runs of one or more sweeps: a Markdown table, plots, optionally a W&B report.

    python experiments/report.py multirun/moe_vs_dense/2026-01-01_12-00-00 [MORE_SWEEP_DIRS] \
        [--out DIR] [--wandb [--entity E] [--project P]]

Writes into the first sweep directory (or --out): `report.md` (the table), `report.json` (the same
rows, unrounded), `val_loss.png` (validation loss against tokens, every run on one chart) and
`expert_load.png` (per run: the share of tokens each expert received in each MoE layer).
Runs that crashed, failed or are still running are listed with their state, never dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

from experiments.report_runs import (
    BALANCE_TAIL,
    RunInfo,
    find_run_dirs,
    read_run,
    summarise,
    varying_keys,
)

__all__ = [
    "load_runs",
    "main",
    "markdown_table",
    "plot_expert_load",
    "plot_val_loss",
    "run_label",
    "write_report",
]

COLUMNS = [  # (row key, header, format)
    ("state", "state", "{}"),
    ("step", "steps", "{}"),
    ("parameters", "params", "M"),
    ("active_parameters", "active params", "M"),
    ("tokens", "tokens", "{:,}"),
    ("best_val_loss", "best val loss", "{:.4f}"),
    ("best_val_ppl", "best val ppl", "{:.2f}"),
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("final_val_ppl", "final val ppl", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("load_max_over_mean", "expert load max/mean", "{:.3f}"),
    ("dropped", "dropped", "{:.2%}"),
]


def load_runs(sweep_dirs: list[Path]) -> list[RunInfo]:
    runs = [read_run(d, Path(s)) for s in sweep_dirs for d in find_run_dirs(Path(s))]
    if not runs:
        raise SystemExit(f"error: no run directories (with .hydra/overrides.yaml) under "
                         f"{', '.join(map(str, sweep_dirs))}")
    return runs


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if spec == "M":
        return f"{value / 1e6:.2f}M"
    return spec.format(value)


def run_label(run: RunInfo, keys: list[str], width: int = 80) -> str:
    """The run's varying overrides, e.g. "arm=moe8" (shortened for plot legends and titles)."""
    label = " ".join(f"{k}={run.overrides.get(k, '—')}" for k in keys) or run.path.name
    return textwrap.shorten(label, width, placeholder=" ...")


def markdown_table(runs: list[RunInfo], rows: list[dict[str, Any]], keys: list[str]) -> str:
    extra = sorted({k for row in rows for k in row if k.startswith("final_val_")
                    and "_len" in k})
    columns = COLUMNS + [(k, k.removeprefix("final_").replace("_len", " @"),
                          "{:.2f}" if "ppl" in k else "{:.4f}") for k in extra]
    header = ["run", *keys, *(c[1] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, row in zip(runs, rows):
        cells = [row["run"], *(run.overrides.get(k, "—") for k in keys),
                 *(_fmt(row.get(k), spec) for k, _, spec in columns)]
        if row["state"] != "finished" and row["max_steps"]:
            cells[len(keys) + 2] = f"{row['step']}/{row['max_steps']}"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_loss(runs: list[RunInfo], keys: list[str], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        evals = [r for r in run.records if "val_loss" in r]
        if evals:
            state = "" if run.state == "finished" else f" ({run.state})"
            ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                    label=run_label(run, keys) + state)
    ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)",
           title="validation loss against tokens seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_load(run: RunInfo) -> tuple[list[str], list[list[float]]] | None:
    """Per MoE layer, each expert's share of routed tokens averaged over the final steps."""
    routed = [r for r in run.records if r.get("router")]
    if not routed:
        return None
    tail = routed[-max(1, math.ceil(len(routed) * BALANCE_TAIL)):]
    layers = sorted(tail[-1]["router"], key=int)
    load = [[statistics.fmean(r["router"][layer]["load"][e] for r in tail)
             for e in range(len(tail[-1]["router"][layer]["load"]))] for layer in layers]
    return layers, load  # load: [layer][expert]


def plot_expert_load(runs: list[RunInfo], keys: list[str], path: Path) -> Path | None:
    """One heatmap per MoE run (rows: MoE layers, columns: experts); None if no run routes."""
    loads = [(run, _mean_load(run)) for run in runs]
    loads = [(run, m) for run, m in loads if m is not None]
    if not loads:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(loads), 1, figsize=(8, 1.2 + 1.0 * sum(len(m[0]) for _, m in loads)),
                             squeeze=False)
    for ax, (run, (layers, load)) in zip(axes[:, 0], loads):
        even = 1 / len(load[0])
        im = ax.imshow(load, aspect="auto", cmap="coolwarm", vmin=0, vmax=2 * even)
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_xticks(range(len(load[0])))
        ax.set_title(run_label(run, keys), fontsize=8)
        fig.colorbar(im, ax=ax, label=f"even: {even:.3f}")
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle(f"expert load, mean of the last {BALANCE_TAIL:.0%} of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep_dirs: list[Path], out: Path) -> tuple[list[RunInfo], str, list[Path]]:
    """Read the sweeps, write report.md / report.json / plots into `out`; return what was read,
    the table and the files written."""
    runs = load_runs(sweep_dirs)
    rows = [summarise(r) for r in runs]
    keys = varying_keys([r.overrides for r in runs])
    common = [f"{k}={v}" for k, v in runs[0].overrides.items() if k not in keys]
    if len(sweep_dirs) > 1:
        for run, row in zip(runs, rows):
            if run.path != run.sweep:
                row["run"] = f"{run.sweep.name}/{row['run']}"
    table = markdown_table(runs, rows, keys)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_val_loss(runs, keys, out / "val_loss.png")]
    expert_plot = plot_expert_load(runs, keys, out / "expert_load.png")
    written += [expert_plot] if expert_plot else []
    names = sorted({r.config.get("experiment_name") or r.sweep.name for r in runs})
    not_done = [row for row in rows if row["state"] != "finished"]
    text = "\n".join([
        f"# Sweep report: {', '.join(names)}",
        "",
        "Sweep directories: " + ", ".join(f"`{s}`" for s in sweep_dirs),
        "",
        "Common overrides: " + (" ".join(f"`{c}`" for c in common) or "none"),
        "",
        table,
        "",
        f"{len(rows)} runs, {len(not_done)} not finished"
        + (": " + ", ".join(f"{row['run']} {row['state']}" for row in not_done) if not_done else "")
        + ".",
        "",
        ("Validation perplexity = exp(validation loss). *best*: the evaluation with the lowest "
         "validation loss; *final*: the last evaluation; `val_loss @N`: the last evaluation at "
         "length N (`train.extra_eval_seq_lens`). tokens/s: median over logged steps. "
         "Expert load max/mean (1 = even) and dropped share: mean over MoE layers and the last "
         f"{BALANCE_TAIL:.0%} of logged steps. Steps of an unfinished run read done/planned."),
        "",
        *(f"![{p.stem}]({p.name})" for p in written),
        "",
    ])
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(
        {"sweeps": [str(s) for s in sweep_dirs], "varying": keys, "rows": rows}, indent=1))
    return runs, table, [out / "report.md", out / "report.json", *written]


def _publish_wandb(runs: list[RunInfo], table: str, args: argparse.Namespace) -> None:
    from experiments.report_wandb import build_wandb_report, server_problem

    problem = server_problem()
    if problem:
        print(f"W&B report not created: it needs a reachable W&B server and a login "
              f"(`wandb login`), then the runs uploaded with "
              f"`wandb sync SWEEP_DIR/*/wandb/offline-run-*` ({problem}). "
              "The local report above is complete.")
        return
    logger = runs[0].config.get("logger", {})
    entity = args.entity or logger.get("entity")
    project = args.project or logger.get("project") or "h64lm"
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    names = sorted({r.config.get("experiment_name") or r.sweep.name for r in runs})
    report = build_wandb_report(runs, table, entity, project, f"Sweep: {', '.join(names)}")
    report.save()
    print(f"W&B report: {report.url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (or run) directories")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep dir)")
    parser.add_argument("--wandb", action="store_true", help="also build and save a W&B report")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity)")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweep_dirs if not s.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs, table, written = write_report(args.sweep_dirs, args.out or args.sweep_dirs[0])
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in written))
    if args.wandb:
        _publish_wandb(runs, table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
