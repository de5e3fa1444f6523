"""Run directories written by hand, shaped like the trainer's (metrics.jsonl, status.json,
.hydra/{config,overrides}.yaml and .hydra/launches/<time>/), so every number in them is known in
advance and the report tests take seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

__all__ = ["TOKENS_PER_STEP", "add_launch", "fake_run", "make_records", "with_keys"]

TOKENS_PER_STEP = 64


def make_records(seed, steps=40, log_every=1, eval_every=10, n_experts=4, layers=("1",),
                 val_shift=0.0):
    """Logged-step records shaped like the trainer's: a noisy falling loss, a step time, a skewed
    expert load per MoE layer, val_* (4.5 - step / steps + val_shift) on evaluation steps."""
    rng = np.random.default_rng(seed)
    records = []
    for step in range(log_every, steps + 1, log_every):
        rec = {"step": step, "tokens": step * TOKENS_PER_STEP,
               "loss": float(5 - step / steps + rng.normal(0, 0.3)),
               "step_time_s": float(rng.uniform(0.05, 0.2))}
        rec["tokens_per_s"] = TOKENS_PER_STEP / rec["step_time_s"]
        rec["router"] = {}
        for layer in layers:
            load = rng.dirichlet(np.linspace(0.5, 3, n_experts))
            rec["router"][layer] = {"load": load.tolist(), "dropped": 0.0,
                                    "load_max_over_mean": float(load.max() * n_experts)}
        if step % eval_every == 0:
            rec["val_loss"] = float(4.5 - step / steps + val_shift)
            rec["val_ppl"] = float(np.exp(rec["val_loss"]))
        records.append(rec)
    return records


def add_launch(run_dir: Path, stamp: str, config: dict, overrides: list[str]) -> Path:
    """One launch record, as Hydra writes it (`hydra.output_subdir` = .hydra/launches/<time>)."""
    record = Path(run_dir) / ".hydra" / "launches" / stamp
    record.mkdir(parents=True)
    (record / "config.yaml").write_text(yaml.safe_dump(config))
    (record / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return record


def fake_run(run_dir, config, overrides, records=None, state="finished", files=()):
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if records is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run_dir / "status.json").write_text(json.dumps({"state": state}))
    for name in files:
        (run_dir / name).write_text("{}")
    return run_dir


def with_keys(config, **groups):
    out = json.loads(json.dumps(config))
    for group, values in groups.items():
        out[group].update(values)
    return out
