"""Weights & Biases logging (rank 0). Offline by default; `wandb sync` uploads later.

Each run is opened and closed by this object: in a Hydra multirun, a run left open makes the next
job's `wandb.init` hand back the old run (so job 1's metrics would land in job 0's run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from h64lm.config import LoggerConfig
from h64lm.validation import check

__all__ = ["WandbSink", "resolve_mode", "check_can_log", "flatten", "wandb_group"]


def resolve_mode(cfg: LoggerConfig) -> str:
    if cfg.name == "none":
        return "disabled"
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


def check_can_log(cfg: LoggerConfig) -> None:
    """Before any work: an online W&B run needs credentials (a key or a `wandb login` netrc)."""
    if resolve_mode(cfg) != "online" or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]
    check(netrc.is_file() and host in netrc.read_text(errors="replace"),
          "logger.mode=online needs W&B credentials (WANDB_API_KEY or `wandb login`); use "
          "logger.mode=offline (and `wandb sync` later) or logger=none")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def wandb_group(cfg: LoggerConfig, experiment_name: str | None, sweep_dir: str | None) -> str | None:
    """Runs of one sweep share a group: the explicit one, the experiment's name, or the sweep dir."""
    if cfg.group:
        return cfg.group
    if experiment_name:
        return experiment_name
    return Path(sweep_dir).name if sweep_dir else None


class WandbSink:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        config: dict[str, Any],
        overrides: list[str],
        group: str | None,
        job_type: str = "train",
        run_id: str | None = None,
    ):
        self.mode = resolve_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_DATA_DIR", str(Path(run_dir) / "wandb"))
        tags = list(cfg.tags) + [o[:64] for o in overrides]
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            job_type=job_type,
            tags=tags,
            name=Path(run_dir).name if group is None else f"{group}/{Path(run_dir).name}",
            dir=str(run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            config={**flatten(config), "overrides": overrides},
            reinit="finish_previous",
        )

    @classmethod
    def disabled(cls) -> "WandbSink":
        """A sink that logs nothing (ranks > 0)."""
        sink = cls.__new__(cls)
        sink.mode, sink.run = "disabled", None
        return sink

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(flatten(record), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
