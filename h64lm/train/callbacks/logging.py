"""Where a run's numbers go: metrics.jsonl, W&B, the final plot and summary, status.json."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from h64lm.train.callbacks.base import Callback
from h64lm.train.metrics import MetricsFile, plot_run, read_metrics
from h64lm.train.wandb_sink import WandbSink, wandb_group

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["MetricsLog", "StatusFile"]


class MetricsLog(Callback):
    """Rank 0: every `train.log_every`-th record and every evaluation record to metrics.jsonl and
    W&B (the run id travels in checkpoints, so a resumed run continues its W&B run); at the end,
    the plots and the W&B summary."""

    def __init__(self) -> None:
        self.file: MetricsFile | None = None
        self.sink = WandbSink.disabled()

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not trainer.d.is_main:
            return
        self.file = MetricsFile(trainer.run_dir / "metrics.jsonl", resume_step=trainer.step)
        run, lg = trainer.run, trainer.run.logger
        self.sink = WandbSink(lg, trainer.run_dir, OmegaConf.to_container(OmegaConf.structured(run)),
                              trainer.overrides, wandb_group(lg, run.experiment_name, trainer.sweep_dir),
                              run_id=trainer.wandb_run_id)
        trainer.wandb_run_id = self.sink.run_id

    def on_record(self, trainer: "Trainer", record: dict[str, Any], is_eval: bool) -> None:
        if self.file is not None and (trainer.step % trainer.run.train.log_every == 0 or is_eval):
            self.file.write(record)
            self.sink.log({k: v for k, v in record.items() if k != "step"}, step=trainer.step)

    def on_fit_end(self, trainer: "Trainer", state: str, summary: dict[str, Any] | None) -> None:
        if self.file is not None:
            self.file.close()
            if summary is not None:
                plot_run(trainer.run_dir, read_metrics(trainer.run_dir / "metrics.jsonl"), trainer.history)
                self.sink.summary(summary)
        self.sink.finish(exit_code=0 if state == "finished" else 1)


class StatusFile(Callback):
    """`status.json`: running / finished / stopped / diverged / failed, for sweep reports (rank 0)."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._write(trainer, "running")

    def on_fit_end(self, trainer: "Trainer", state: str, summary: dict[str, Any] | None) -> None:
        self._write(trainer, state)

    @staticmethod
    def _write(trainer: "Trainer", state: str) -> None:
        if trainer.d.is_main:
            status = {"state": state, "step": trainer.step, "pid": os.getpid(), "host": socket.gethostname(),
                      "time": time.time()}
            (trainer.run_dir / "status.json").write_text(json.dumps(status))
