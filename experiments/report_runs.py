"""Read the run directories of one or more sweeps into one summary row per run.

A run directory is any folder holding `.hydra/overrides.yaml` (what Hydra writes for every job).
Everything else is optional, so a run that crashed early or is still going still gets a row:
`status.json` says how it ended (a "running" run whose process is gone on this host crashed),
`metrics.jsonl` carries the per-step numbers, `summary.json` exists only after a clean finish.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BALANCE_TAIL",
    "RunInfo",
    "find_run_dirs",
    "read_run",
    "run_state",
    "summarise",
    "varying_keys",
]

# Expert balance and dropped share are averaged over this final fraction of the logged steps:
# early steps reflect the random router, not what training settles on.
BALANCE_TAIL = 0.25


@dataclass
class RunInfo:
    path: Path
    sweep: Path
    overrides: dict[str, str]  # override key (without a leading "+") -> value, as typed
    config: dict[str, Any]  # the job's resolved config (.hydra/config.yaml)
    state: str  # finished | running | stopped | diverged | failed | crashed
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    summary: dict[str, Any] | None = None  # summary.json (clean finish only)
    wandb_id: str | None = None  # the W&B run id, from wandb/offline-run-*-<id> or run-*-<id>


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Every run directory under `sweep_dir` (itself included), job folders in numeric order."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in rel)

    return sorted(found, key=order)


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


def read_run(run_dir: Path, sweep_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    config_path = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    return RunInfo(
        path=run_dir,
        sweep=Path(sweep_dir),
        overrides=_parse_overrides(overrides),
        config=config or {},
        state=run_state(run_dir),
        records=_read_metrics(run_dir / "metrics.jsonl"),
        summary=_read_json(run_dir / "summary.json"),
        wandb_id=_wandb_id(run_dir),
    )


def varying_keys(mappings: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every mapping (missing counts as a value), in the
    order they first appear."""
    keys: dict[str, None] = {}
    for m in mappings:
        keys.update(dict.fromkeys(m))
    return [k for k in keys if len({json.dumps(m.get(k), sort_keys=True, default=str)
                                    for m in mappings}) > 1]


def _parameters(run: RunInfo) -> tuple[int | None, int | None]:
    if run.summary and "parameters" in run.summary:
        return run.summary["parameters"], run.summary.get("active_parameters")
    if "model" not in run.config:
        return None, None
    # A run that never finished has no summary.json: count from its config instead.
    from h64lm.model import H64LMConfig, active_parameters_per_token, count_parameters

    mcfg = H64LMConfig(**run.config["model"])
    return count_parameters(mcfg), active_parameters_per_token(mcfg)


def _router_tail(records: list[dict[str, Any]], key: str) -> float | None:
    routed = [r for r in records if r.get("router")]
    if not routed:
        return None
    tail = routed[-max(1, math.ceil(len(routed) * BALANCE_TAIL)):]
    return statistics.fmean(layer[key] for r in tail for layer in r["router"].values())


def summarise(run: RunInfo) -> dict[str, Any]:
    """The table row of one run. Validation numbers come from the evaluation records of
    `metrics.jsonl`; "best" is the lowest validation loss and the perplexity at that evaluation."""
    evals = [r for r in run.records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    final = evals[-1] if evals else None
    params, active = _parameters(run)
    row: dict[str, Any] = {
        "run": str(run.path.relative_to(run.sweep)) if run.path != run.sweep else run.path.name,
        "state": run.state,
        "step": run.records[-1]["step"] if run.records else 0,
        "max_steps": run.config.get("train", {}).get("max_steps"),
        "parameters": params,
        "active_parameters": active,
        "tokens": run.records[-1]["tokens"] if run.records else 0,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_ppl": best["val_ppl"] if best else None,
        "final_val_loss": final["val_loss"] if final else None,
        "final_val_ppl": final["val_ppl"] if final else None,
        "tokens_per_s": (statistics.median(r["tokens_per_s"] for r in run.records)
                         if run.records else None),
        "load_max_over_mean": _router_tail(run.records, "load_max_over_mean"),
        "dropped": _router_tail(run.records, "dropped"),
    }
    for key in sorted(k for k in (final or {}) if k.startswith(("val_loss_len", "val_ppl_len"))):
        row[f"final_{key}"] = final[key]
    return row
