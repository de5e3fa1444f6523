"""What the trainer tells about itself: one step's record (metrics.jsonl, W&B, the progress bar),
the opening line and the closing summary of a run. Read-only views of a `Trainer`."""

from __future__ import annotations

import math
import resource
from typing import TYPE_CHECKING, Any

import torch

from h64lm.model import active_parameters_per_token, count_parameters
from h64lm.train.step import StepStats

if TYPE_CHECKING:
    from h64lm.train.loop import Trainer

__all__ = ["memory_gb", "step_record", "announcement", "run_summary"]


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def step_record(trainer: Trainer, stats: StepStats, elapsed: float) -> dict[str, Any]:
    record = {"step": trainer.step, "tokens": trainer.tokens_seen, **stats.terms,  # loss first, then each term
              "lr": stats.lr, "grad_norm": stats.grad_norm, "skipped_steps": trainer.skipped_steps,
              "tokens_per_s": stats.tokens / elapsed, "step_time_s": elapsed,
              "mem_gb": memory_gb(trainer.d.device)}
    if trainer.peak:
        record["mfu"] = trainer.flops_per_token * record["tokens_per_s"] / trainer.peak
    record["router"] = {str(i): {"load": [round(v, 5) for v in r.load], "dropped": r.dropped,
                                 "load_max_over_mean": r.max_over_mean} for i, r in stats.router.items()}
    return record


def announcement(trainer: Trainer) -> str:
    n_total, n_active = count_parameters(trainer.model), active_parameters_per_token(trainer.run.model)
    return (f"model: {n_total / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active per token; "
            f"{trainer.accum} micro-batch(es) of train.batch_size={trainer.run.train.batch_size} per step on "
            f"{trainer.d.world_size} process(es), "
            f"{trainer.precision.name} on {trainer.d.device.type}"
            + (f", {trainer.layout.strategy} ep={trainer.layout.ep}" if trainer.d.enabled else ""))


def run_summary(trainer: Trainer) -> dict[str, Any]:
    h, best = trainer.history.data, trainer.history.best_val_loss()
    return {
        "step": trainer.step,
        "tokens": trainer.tokens_seen,
        "best_val_loss": best,
        "best_val_ppl": math.exp(min(best, 50.0)),
        "final_val_loss": h["val_loss"][-1] if h["val_loss"] else None,
        "final_val_ppl": h["val_ppl"][-1] if h["val_ppl"] else None,
        "first_val_loss": h["val_loss"][0] if h["val_loss"] else None,
        "skipped_steps": trainer.skipped_steps,
        "parameters": count_parameters(trainer.model),
        "active_parameters": active_parameters_per_token(trainer.run.model),
    }
