"""Read the run directories of one or more sweeps into one summary row per run.

A run directory is a folder holding `.hydra/overrides.yaml` (what Hydra writes for every job) of a
training job. Folders written by `mode=eval` or `mode=generate` (`eval.json`, `generations.txt`)
and any Hydra folder nested inside a run (`RUN/evals/<time>/`, `RUN/generations/<time>/`) are not
runs: they are skipped and counted. Everything else is optional, so a run that crashed early or is
still going still gets a row:
`status.json` says how it ended (a "running" run whose process is gone on this host crashed),
`metrics.jsonl` carries the per-step numbers, `summary.json` exists only after a clean finish.

A resumed run is read with the settings it finished with: every training launch leaves its composed
config and overrides in `.hydra/launches/<time>/` (h64lm/runtime/rundir.py), and the last of them is
what produced the final steps; `.hydra/{config,overrides}.yaml` stay the first launch's.
"""

from __future__ import annotations

import json
import operator
import os
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.report_series import (
    BALANCE_TAIL,
    ROUTER_SUMMARY_STATS,
    downstream_accuracy,
    final_sft_numbers,
    router_tail_mean,
    train_seconds,
)
from h64lm.runtime.rundir import LAUNCHES

__all__ = [
    "BALANCE_TAIL",
    "RunInfo",
    "find_run_dirs",
    "flops_per_token_of",
    "last_launch",
    "read_run",
    "run_mode",
    "resumed_note",
    "run_state",
    "scan_sweep",
    "summarise",
    "sweep_warnings",
    "varying_keys",
]

# Files only a training job writes: their presence wins over a later eval/generate job that
# reused the same directory (and rewrote .hydra/config.yaml with its own mode).
TRAINING_FILES = ("metrics.jsonl", "status.json", "summary.json")


@dataclass
class RunInfo:
    path: Path
    sweep: Path
    overrides: dict[str, str]  # override key (without a leading "+") -> value, of the last launch
    config: dict[str, Any]  # the resolved config of the last training launch
    state: str  # finished | running | stopped | diverged | failed | crashed
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    summary: dict[str, Any] | None = None  # summary.json (clean finish only)
    wandb_id: str | None = None  # the W&B run id, from wandb/offline-run-*-<id> or run-*-<id>
    launches: int = 1  # training launches (1 + resumes) with a record in .hydra/launches
    first_overrides: dict[str, str] = field(default_factory=dict)  # the first launch's overrides


def run_mode(run_dir: Path) -> str:
    """train | eval | generate: what the job in `run_dir` did. A job that failed before writing
    anything but its config counts by the config's `mode` (train when absent)."""
    if any((run_dir / name).exists() for name in TRAINING_FILES):
        return "train"
    mode = (_read_yaml(run_dir / ".hydra" / "config.yaml") or {}).get("mode")
    if mode:
        return str(mode)
    if (run_dir / "eval.json").exists():
        return "eval"
    return "generate" if (run_dir / "generations.txt").exists() else "train"


def scan_sweep(sweep_dir: Path) -> tuple[list[Path], list[Path]]:
    """(training run directories, other Hydra job directories) under `sweep_dir` (itself
    included), job folders in numeric order. "Other": eval/generate jobs and any job folder inside
    another one (e.g. `RUN/evals/<time>/`)."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in rel)

    runs, other = [], []
    for d in sorted(found, key=order):
        nested = any(parent in found for parent in d.parents)
        (other if nested or run_mode(d) != "train" else runs).append(d)
    return runs, other


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Every training run directory under `sweep_dir` (itself included), in numeric order."""
    return scan_sweep(sweep_dir)[0]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            continue
    return records


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def run_state(run_dir: Path) -> str:
    """How the run stands now. A run left "running" by a SIGKILL (or a node crash) has a dead pid;
    on another host that cannot be checked, so it keeps its recorded state."""
    status = _read_json(run_dir / "status.json")
    if status is None:
        if (run_dir / "summary.json").exists():
            return "finished"
        return "crashed" if (run_dir / "metrics.jsonl").exists() else "failed"
    state = status.get("state", "failed")
    if (state == "running" and status.get("host") == socket.gethostname()
            and not _pid_alive(int(status.get("pid", -1)))):
        return "crashed"
    return state


def _wandb_id(run_dir: Path) -> str | None:
    runs = sorted((run_dir / "wandb").glob("*run-*-*"))
    runs = [p for p in runs if p.is_dir() and p.name.split("-")[0] in ("run", "offline")]
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def _parse_overrides(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+")] = value
    return out


def last_launch(run_dir: Path) -> tuple[Path, int]:
    """(the record folder of the run's last training launch, how many training launches left a
    record). Records are named by launch time, so name order is time order; a refused launch
    removes its record, and one that evaluated or generated into this folder is not training.
    A run from before launch records existed: (`.hydra`, 1)."""
    records = sorted(p for p in (Path(run_dir) / LAUNCHES).glob("*")
                     if (p / "overrides.yaml").exists())
    training = [p for p in records
                if (_read_yaml(p / "config.yaml") or {}).get("mode", "train") == "train"]
    if not training:
        return Path(run_dir) / ".hydra", 1
    return training[-1], len(training)


def read_run(run_dir: Path, sweep_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    first = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    record, launches = last_launch(run_dir)
    overrides = _read_yaml(record / "overrides.yaml") or []
    config = _read_yaml(record / "config.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml")
    return RunInfo(
        path=run_dir,
        sweep=Path(sweep_dir),
        overrides=_parse_overrides(overrides),
        config=config or {},
        state=run_state(run_dir),
        records=_read_metrics(run_dir / "metrics.jsonl"),
        summary=_read_json(run_dir / "summary.json"),
        wandb_id=_wandb_id(run_dir),
        launches=launches,
        first_overrides=_parse_overrides(first),
    )


def resumed_note(runs: list[RunInfo], names: list[str]) -> str | None:
    """One line naming the resumed runs (`names` parallel to `runs`) and the overrides their last
    launch changed, or None when no run was resumed."""
    resumed = []
    for run, name in zip(runs, names):
        if run.launches < 2:
            continue
        keys = varying_keys([run.first_overrides, run.overrides])
        changed = ", ".join(f"{k}: {run.first_overrides.get(k, '—')} -> {run.overrides.get(k, '—')}"
                            for k in keys)
        resumed.append(f"{name} ({run.launches} launches{'; ' + changed if changed else ''})")
    if not resumed:
        return None
    return (f"note: {len(resumed)} run(s) resumed: {', '.join(resumed)}. Their rows show the "
            "overrides and config of the last launch, the one that reached the final step.")


def varying_keys(mappings: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every mapping (missing counts as a value), in the
    order they first appear."""
    keys: dict[str, None] = {}
    for m in mappings:
        keys.update(dict.fromkeys(m))
    return [k for k in keys if len({json.dumps(m.get(k), sort_keys=True, default=str)
                                    for m in mappings}) > 1]


def _model_config(run: RunInfo) -> Any:
    if "model" not in run.config:
        return None
    from h64lm.model import H64LMConfig

    return H64LMConfig(**run.config["model"])


def _parameters(run: RunInfo) -> tuple[int | None, int | None]:
    if run.summary and "parameters" in run.summary:
        return run.summary["parameters"], run.summary.get("active_parameters")
    mcfg = _model_config(run)
    if mcfg is None:
        return None, None
    # A run that never finished has no summary.json: count from its config instead.
    from h64lm.model import active_parameters_per_token, count_parameters

    return count_parameters(mcfg), active_parameters_per_token(mcfg)


def flops_per_token_of(run: RunInfo) -> float | None:
    """Training FLOPs per token (active experts only) of the run's model at its `data.seq_len`;
    None when the config lacks either."""
    mcfg = _model_config(run)
    seq_len = run.config.get("data", {}).get("seq_len")
    if mcfg is None or not seq_len:
        return None
    from h64lm.model import flops_per_token

    return flops_per_token(mcfg, seq_len)


def summarise(run: RunInfo) -> dict[str, Any]:
    """The table row of one run. Validation numbers come from the evaluation records of
    `metrics.jsonl`; "best" is the lowest validation loss and the perplexity at that evaluation."""
    evals = [r for r in run.records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    final = evals[-1] if evals else None
    params, active = _parameters(run)
    flops = flops_per_token_of(run)
    row_tokens = run.records[-1]["tokens"] if run.records else 0
    row: dict[str, Any] = {
        "run": str(run.path.relative_to(run.sweep)) if run.path != run.sweep else run.path.name,
        "state": run.state,
        "step": run.records[-1]["step"] if run.records else 0,
        "max_steps": run.config.get("train", {}).get("max_steps"),
        "parameters": params,
        "active_parameters": active,
        "tokens": row_tokens,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_ppl": best["val_ppl"] if best else None,
        "final_val_loss": final["val_loss"] if final else None,
        "final_val_ppl": final["val_ppl"] if final else None,
        "tokens_per_s": (statistics.median(r["tokens_per_s"] for r in run.records)
                         if run.records else None),
        "load_max_over_mean": router_tail_mean(run.records, "load_max_over_mean"),
        "dropped": router_tail_mean(run.records, "dropped"),
        "train_flops": flops * row_tokens if flops and row_tokens else None,
        "train_seconds": train_seconds(run.records)[-1] if run.records else None,
    }
    for stat in ROUTER_SUMMARY_STATS:
        row[f"router_{stat}"] = router_tail_mean(run.records, stat)
    row.update(final_sft_numbers(run.records))
    for task, acc in sorted(downstream_accuracy(run.records).items()):
        row[f"downstream/{task}/acc"] = acc
    for key in sorted(k for k in (final or {}) if k.startswith(("val_loss_len", "val_ppl_len"))):
        row[f"final_{key}"] = final[key]
    return row


# (left key, comparison, right key, what it does to the comparison and what to change)
SHORTENED = [
    ("train.max_steps", "<", "train.eval_every",
     "validated only at the final step, so each validation curve is one point; lower "
     "train.eval_every or raise train.max_steps"),
    ("optim.warmup_steps", ">=", "train.max_steps",
     "the learning rate never leaves warmup, so the runs compare warmup phases only; lower "
     "optim.warmup_steps or raise train.max_steps"),
]


def sweep_warnings(runs: list[RunInfo], names: list[str]) -> list[str]:
    """One line per shortening condition that holds for some runs (`names` is parallel to
    `runs`), naming the runs, their values and the keys to change."""
    compare = {"<": operator.lt, ">=": operator.ge}

    def get(run: RunInfo, dotted: str) -> Any:
        group, key = dotted.split(".")
        return run.config.get(group, {}).get(key)

    lines = []
    for left, op, right, effect in SHORTENED:
        hit = []
        for run, name in zip(runs, names):
            a, b = get(run, left), get(run, right)
            if isinstance(a, int) and isinstance(b, int) and compare[op](a, b):
                hit.append(f"{name} ({a} {op} {b})")
        if hit:
            lines.append(f"warning: {left} {op} {right} in {len(hit)} run(s): {', '.join(hit)}; "
                         f"{effect}.")
    return lines
