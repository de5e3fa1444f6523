"""Compare the runs of one or more sweeps: a Markdown table, plots, optionally a W&B report.

    python experiments/report.py multirun/balancing/2026-01-01_12-00-00 [MORE_SWEEP_DIRS] \
        [--reference balance=none] [--out DIR] [--wandb [--entity E] [--project P]]

Writes into the first sweep directory (or --out): `report.md` (the arms table: runs that differ
only in their seed grouped, mean and spread per arm, differences against a reference arm with
their noise and a verdict; then one row per run), `report.json` (the same rows and arms,
unrounded, and every plotted series), `loss_vs_imbalance.png` (final validation loss against
expert load max/mean, per run and per arm), `loss.png` (smoothed training loss and validation loss
against tokens), `val_loss_vs_flops.png` and `val_loss_vs_time.png` (validation loss at equal
training compute / time), `expert_load.png` (per run and MoE layer: each expert's load / mean load
at the end of training) and `expert_load_steps/<run>.png` (per run, per layer: the same over steps).
Runs that crashed, failed or are still running are listed with their state, never dropped; eval
and generate job folders are not runs and are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from experiments.report_arms import (
    Arm,
    arms_markdown,
    choose_reference,
    compare_arms,
    group_arms,
    pooled_std,
)
from experiments.report_plots import (
    file_stem,
    plot_expert_balance,
    plot_expert_load_steps,
    plot_loss_vs_imbalance,
    plot_losses,
    plot_val_loss_against,
)
from experiments.report_runs import (
    BALANCE_TAIL,
    RunInfo,
    flops_per_token_of,
    read_run,
    resumed_note,
    scan_sweep,
    summarise,
    sweep_warnings,
    varying_keys,
)
from experiments.report_series import EMA_BETA, ROUTER_SUMMARY_STATS, run_curves

__all__ = [
    "load_runs",
    "main",
    "markdown_table",
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
    ("train_flops", "PFLOP", "P"),
    ("train_seconds", "train s", "{:,.1f}"),
]
# Shown only when some run logged them.
OPTIONAL_COLUMNS = [(f"router_{stat}", header, "{:.3f}")
                    for stat, header in ROUTER_SUMMARY_STATS.items()] + [
    ("final_exact_match", "exact match", "{:.3f}"),  # stage=sft on data=arithmetic
    ("final_top1_changed_from_start", "top-1 changed from start", "{:.3f}"),  # stage=sft, MoE
]


def load_runs(sweep_dirs: list[Path]) -> tuple[list[RunInfo], list[str]]:
    """(the training runs, the other job folders skipped, relative to their sweep directory)
    under the sweep directories."""
    runs, skipped = [], []
    for s in map(Path, sweep_dirs):
        found, other = scan_sweep(s)
        runs += [read_run(d, s) for d in found]
        skipped += [str(d.relative_to(s)) for d in other]
    if not runs:
        raise SystemExit(f"error: no training run directories (with .hydra/overrides.yaml) under "
                         f"{', '.join(map(str, sweep_dirs))} ({len(skipped)} eval/generate or "
                         "nested job folders skipped)")
    return runs, skipped


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if spec == "M":
        return f"{value / 1e6:.2f}M"
    if spec == "P":
        return f"{value / 1e15:.3g}"
    return spec.format(value)


def run_label(run: RunInfo, keys: list[str], width: int = 80) -> str:
    """The run's varying overrides, e.g. "arm=moe8" (shortened for plot legends and titles)."""
    label = " ".join(f"{k}={run.overrides.get(k, '—')}" for k in keys) or run.path.name
    return textwrap.shorten(label, width, placeholder=" ...")


def markdown_table(runs: list[RunInfo], rows: list[dict[str, Any]], keys: list[str]) -> str:
    present = {k for row in rows for k, v in row.items() if v is not None}
    optional = [c for c in OPTIONAL_COLUMNS if c[0] in present]
    tasks = sorted(k for k in present if k.startswith("downstream/"))
    extra = sorted(k for k in present if k.startswith("final_val_") and "_len" in k)
    columns = (COLUMNS + optional
               + [(k, f"{k.split('/')[1]} acc", "{:.3f}") for k in tasks]
               + [(k, k.removeprefix("final_").replace("_len", " @"),
                   "{:.2f}" if "ppl" in k else "{:.4f}") for k in extra])
    header = ["run", *keys, *(c[1] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, row in zip(runs, rows):
        cells = [row["run"], *(run.overrides.get(k, "—") for k in keys),
                 *(_fmt(row.get(k), spec) for k, _, spec in columns)]
        if row["state"] != "finished" and row["max_steps"]:
            cells[len(keys) + 2] = f"{row['step']}/{row['max_steps']}"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plots(runs: list[RunInfo], rows: list[dict[str, Any]], keys: list[str],
           curves: list[dict[str, Any]], arms: list[Arm], out: Path) -> list[Path]:
    labels = [f"{row['run']}: {run_label(run, keys, 60)}"
              + ("" if run.state == "finished" else f" ({run.state})")
              for run, row in zip(runs, rows)]
    written = [plot_loss_vs_imbalance(arms, rows, out / "loss_vs_imbalance.png"),
               plot_losses(labels, curves, out / "loss.png"),
               plot_val_loss_against(labels, curves, "flops", out / "val_loss_vs_flops.png"),
               plot_val_loss_against(labels, curves, "seconds", out / "val_loss_vs_time.png"),
               plot_expert_balance(runs, labels, out / "expert_load.png")]
    steps_dir = out / "expert_load_steps"
    for run, row, label in zip(runs, rows, labels):
        written.append(plot_expert_load_steps(run, label, steps_dir / f"{file_stem(row['run'])}.png"))
    return [p for p in written if p is not None]


def _arms_section(arms_table: str, arms: list[Arm], reference: Arm) -> list[str]:
    noise, dof = pooled_std(arms)
    return [
        "## Arms",
        "",
        arms_table,
        "",
        ("An arm is the runs whose overrides are equal apart from `train.seed` (and "
         "`train.resume`, `logger.*`); only finished runs count. Cells: mean ± sample standard "
         "deviation [min, max] over the arm's runs (the mean alone for one run). "
         f"Δ: the arm's mean minus the reference arm's (**{reference.label}**; `--reference` "
         "picks another) ± twice its standard error; the verdict says *within noise* when |Δ| "
         "is not larger. *paired*: both arms ran the same seeds (the same data order, and the "
         "same initial weights where the arms' shapes agree), so Δ is the mean of the per-seed "
         "differences d_i and its standard error "
         "std(d_i)/sqrt(n), free of the seed's own effect; otherwise Welch's "
         "sqrt(s_a²/n_a + s_r²/n_r). "
         "Load max/mean: lower is more even. Exact match (SFT): higher is better; top-1 changed "
         "from start (SFT): the share of tokens the router sends elsewhere than the starting "
         "model did. "
         + (f"Seed noise of one run (standard deviation of the final validation loss between "
            f"seeds, pooled over arms): {noise:.4f} ({dof} degrees of freedom)."
            if noise is not None else
            "No arm has two finished runs, so the seed noise is unknown: rerun with "
            "`train.seed=0,1,2` to tell differences from noise.")),
        "",
        "## Runs",
        "",
    ]


def write_report(sweep_dirs: list[Path], out: Path, reference: str | None = None
                 ) -> tuple[list[RunInfo], str, str, list[Path], list[str]]:
    """Read the sweeps, write report.md / report.json / plots into `out`; return what was read,
    the arms table ("" for a single run), the runs table, the files written and the note lines
    (warnings, skipped folders, resumed runs). `reference`:
    the arm to compare against, as overrides ("balance=none"); default: the preset's
    `experiment_reference`, else the first arm."""
    runs, skipped = load_runs(sweep_dirs)
    rows = [summarise(r) for r in runs]
    keys = varying_keys([r.overrides for r in runs])
    common = [f"{k}={v}" for k, v in runs[0].overrides.items() if k not in keys]
    if len(sweep_dirs) > 1:
        for run, row in zip(runs, rows):
            if run.path != run.sweep:
                row["run"] = f"{run.sweep.name}/{row['run']}"
    arms = group_arms(runs, rows)
    ref_arm, ref_note = choose_reference(arms, runs, reference)  # a bad --reference stops here
    compare_arms(arms, ref_arm)
    table = markdown_table(runs, rows, keys)
    arms_table = arms_markdown(arms, ref_arm) if len(runs) > 1 else ""
    curves = [run_curves(run.records, flops_per_token_of(run)) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    written = _plots(runs, rows, keys, curves, arms, out)
    names = sorted({r.config.get("experiment_name") or r.sweep.name for r in runs})
    not_done = [row for row in rows if row["state"] != "finished"]
    notes = sweep_warnings(runs, [row["run"] for row in rows])
    notes += [n for n in (ref_note, resumed_note(runs, [row["run"] for row in rows])) if n]
    if skipped:
        notes.append(f"note: skipped {len(skipped)} non-training job folder(s) (mode=eval / "
                     "mode=generate outputs, or job folders nested inside a run): "
                     + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "") + ".")
    text = "\n".join([
        f"# Sweep report: {', '.join(names)}",
        "",
        "Sweep directories: " + ", ".join(f"`{s}`" for s in sweep_dirs),
        "",
        "Common overrides: " + (" ".join(f"`{c}`" for c in common) or "none"),
        "",
        *(line for note in notes for line in (note, "")),
        *(_arms_section(arms_table, arms, ref_arm) if arms_table else []),
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
         f"{BALANCE_TAIL:.0%} of logged steps (router entropy and top-1 changed likewise, when "
         "logged). PFLOP: training FLOPs with active parameters only "
         "(`h64lm.model.flops_per_token` at `data.seq_len`, times tokens seen). train s: "
         "training seconds, the sum of logged step times (a step not logged counts as long as "
         "the next logged one; evaluation excluded). `<task> acc`: the last logged "
         "`downstream/<task>/acc`. SFT runs (`stage=sft`): *exact match* is the last "
         "`sft/exact_match` (held-out test problems answered greedily; `RUN/exact_match.json` "
         "has the starting model's at step 0) and *top-1 changed from start* the share of "
         "tokens whose top-1 expert differs from the starting model's at the last evaluation, "
         "mean over MoE layers. Steps of an unfinished run read done/planned. A resumed "
         "run shows the overrides and config of its last launch."),
        "",
        "`loss_vs_imbalance.png`: final validation loss against expert load max/mean, one dot "
        "per finished run coloured by arm, each arm's mean ± seed standard deviation as a "
        "diamond. "
        f"`loss.png`: training loss smoothed by a bias-corrected EMA (beta = {EMA_BETA} over "
        "logged steps; raw loss faint) beside validation loss, both against tokens. "
        "`val_loss_vs_flops.png` / `val_loss_vs_time.png`: validation loss at equal training "
        "compute / time. `expert_load.png`: load / mean load per expert and MoE layer over the "
        f"last {BALANCE_TAIL:.0%} of logged steps, log colour scale centred at 1 (blue: "
        "under-used, red: over-used), fixed at 1/8x..8x in every figure, the runs' own "
        "`expert_load.png` included. `expert_load_steps/<run>.png`: the same per logged step.",
        "",
        *(f"![{p.stem}]({p.relative_to(out)})" for p in written),
        "",
    ])
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(
        {"sweeps": [str(s) for s in sweep_dirs], "varying": keys, "notes": notes, "rows": rows,
         "reference": ref_arm.label, "arms": [dataclasses.asdict(a) for a in arms],
         "curves": {row["run"]: c for row, c in zip(rows, curves)}}, indent=1))
    return runs, arms_table, table, [out / "report.md", out / "report.json", *written], notes


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
    parser.add_argument("--reference", help="the arm the others are compared with, as its "
                        "overrides, e.g. balance=none (default: the preset's "
                        "experiment_reference, else the first arm)")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep dir)")
    parser.add_argument("--wandb", action="store_true", help="also build and save a W&B report")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity)")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweep_dirs if not s.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs, arms_table, table, written, notes = write_report(
        args.sweep_dirs, args.out or args.sweep_dirs[0], args.reference)
    for note in notes:
        print(note, file=sys.stderr if note.startswith("warning") else sys.stdout)
    if arms_table:
        print(arms_table + "\n")
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in written))
    if args.wandb:
        _publish_wandb(runs, "\n\n".join(t for t in (arms_table, table) if t), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
