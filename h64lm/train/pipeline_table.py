"""RUN/pipeline.md and pipeline.json: one row per stage of `mode=pipeline`, read from the
stage's own files, so a requeued pipeline rebuilds the same table.

- exact match and "val loss (eval)": `mode=eval` of the stage's final weights with
  `pipeline.eval_overrides` (RUN/stages/<k>_<name>/evals/pipeline/eval.json): the same held-out
  problems and conversations for every stage, pretraining included;
- "vs previous": the exact-match change from the stage before, paired problem by problem (both
  stages answer the same problems: `h64lm.eval.exact_match.paired_diff`), with 2 standard errors;
- "val loss (stage)": the stage's last `val_loss` in its metrics.jsonl, on its own data;
- rewards: the last value of every key that starts with `rewards/` or `reward/` (DPO and reward
  stages log `rewards/margins`, `rewards/accuracies`; RL `reward/mean`);
- routing shift: the share of tokens whose top-1 expert differs from the stage's starting model
  (`routing.<layer>.top1_changed_from_start`, mean over MoE layers) at the stage's last evaluation;
- wall: seconds the stage's processes ran, over every attempt of a requeued pipeline.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from h64lm.eval.exact_match import paired_diff
from h64lm.train.metrics import read_metrics

__all__ = ["stage_row", "routing_shift", "format_table", "write_table"]

_REWARD_PREFIXES = ("rewards/", "reward/")
_SHIFT = re.compile(r"routing[./]([^./]+)[./]top1_changed_from_start")


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def routing_shift(record: dict[str, Any]) -> Optional[float]:
    """Mean over MoE layers of `top1_changed_from_start` in one metrics record (nested as
    metrics.jsonl writes it, or flat as W&B names it); None when the record has none."""
    shifts = [v for k, v in _flat(record).items() if _SHIFT.fullmatch(k)]
    return sum(shifts) / len(shifts) if shifts else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_row(index: int, name: str, stage_dir: Path, wall_s: Optional[float],
              eval_dir: Optional[Path] = None) -> dict[str, Any]:
    records = read_metrics(stage_dir / "metrics.jsonl")
    status = _read_json(stage_dir / "status.json")
    evaluated = _read_json(eval_dir / "eval.json") if eval_dir is not None else {}
    val = [r["val_loss"] for r in records if "val_loss" in r]
    shifts = [s for s in map(routing_shift, records) if s is not None]
    rewards = {k: v for r in records for k, v in r.items() if k.startswith(_REWARD_PREFIXES)}
    return {
        "stage": index, "name": name, "dir": f"stages/{stage_dir.name}",
        "state": status.get("state"), "steps": status.get("step"),
        "exact_match": evaluated.get("sft/exact_match"),
        "exact_match_examples": evaluated.get("exact_match_examples"),
        "exact_match_solved": evaluated.get("exact_match_solved"),
        "eval_data": evaluated.get("data"), "eval_val_loss": evaluated.get("val_loss"),
        "val_loss": val[-1] if val else None,
        "rewards": rewards,
        "routing_shift": shifts[-1] if shifts else None,
        "wall_s": wall_s,
    }


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _wall(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}:{s:02d}"


def _outcomes(row: Optional[dict[str, Any]]) -> Optional[list]:
    """The row's per-problem outcomes, or None when absent or not a list of 0/1 (an eval.json from
    an older version or edited by hand must not stop the table)."""
    solved = row.get("exact_match_solved") if row else None
    ok = isinstance(solved, list) and all(v in (0, 1) and not isinstance(v, float) for v in solved)
    return solved if ok else None


def _vs_previous(row: dict[str, Any], previous: Optional[dict[str, Any]]) -> str:
    a, b = _outcomes(previous), _outcomes(row)
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return "–"
    d = paired_diff(a, b)
    return f"{d.diff:+.3f} ± {d.two_se:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of `rows` (stage_row's), with a line saying where each column comes from."""
    examples = next((r["exact_match_examples"] for r in rows if r["exact_match_examples"]), None)
    data = next((r["eval_data"] for r in rows if r["eval_data"]), None)
    lines = [
        "| stage | steps | exact match | vs previous | val loss (eval) | val loss (stage) | rewards | routing shift "
        "| wall (m:s) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for previous, r in zip([None, *rows], rows):
        rewards = ", ".join(f"{k} {_num(v, 3)}" for k, v in sorted(r["rewards"].items())) or "–"
        state = "" if r["state"] == "finished" else f" ({r['state'] or 'not started'})"
        lines.append(f"| {r['stage']} {r['name']}{state} | {r['steps'] if r['steps'] is not None else '–'} | "
                     f"{_num(r['exact_match'], 3)} | {_vs_previous(r, previous)} | {_num(r['eval_val_loss'], 4)} | "
                     f"{_num(r['val_loss'], 4)} | "
                     f"{rewards} | {_num(r['routing_shift'], 3)} | {_wall(r['wall_s'])} |")
    notes = ["", f"exact match: greedy answers to {examples or '–'} held-out test problems (vs previous: the change "
             "from the stage before on the same problems, ± 2 standard errors of the paired difference) and "
             "val loss (eval): "
             f"held-out {data or '–'} conversations, by `mode=eval` of each stage's final weights "
             "(pipeline.eval_overrides); val loss (stage): the stage's last validation on its own data; "
             "routing shift: share of tokens whose top-1 expert differs from the stage's starting model "
             "(mean over MoE layers, last evaluation); wall: the stage's training processes."]
    return "\n".join(lines + notes) + "\n"


def write_table(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    (Path(run_dir) / "pipeline.json").write_text(json.dumps({"stages": rows}, indent=1))
    (Path(run_dir) / "pipeline.md").write_text(format_table(rows))
