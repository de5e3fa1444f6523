"""Per-rank bodies of the multi-process checkpoint tests (importable, so `spawn` can pickle them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from h64lm.runtime.checkpoint import Checkpointer
from tests.parallel.harness import batches, build, optimizer, step, tiny_config

WRITE_DELAY_S = 3.0


def _slow_writer() -> None:
    """Every shard write sleeps first (in DCP's upload thread), so a background save stays in
    flight across several training steps and their collectives."""
    write = FileSystemWriter.write_data

    def slow(self, plan, planner):
        time.sleep(WRITE_DELAY_S)
        return write(self, plan, planner)

    FileSystemWriter.write_data = slow


def train_async_save(strategy: str, ep: int, steps: int, run_dir: str, save_at: int) -> Dict:
    """Train `steps` steps, saving in the background at `save_at` -> the numbers, and whether the
    save was still in flight after the remaining steps (each with its all-reduces) ran."""
    _slow_writer()
    cfg = tiny_config()
    model = build(cfg, strategy, ep)
    opt = optimizer(model)
    ckpt = Checkpointer(Path(run_dir), keep_last=2, async_save=True, log=lambda s: None)
    numbers: List[Dict] = []
    in_flight_after: Optional[bool] = None
    for i, batch in enumerate(batches(cfg, steps)):
        numbers.append(step(model, opt, batch))
        if i + 1 == save_at:
            ckpt.save(model, opt, {"step": save_at, "rank": dist.get_rank()}, save_at, final=False)
    in_flight_after = ckpt._pending is not None and not ckpt._pending.done()
    ckpt.wait()
    return {"numbers": numbers, "in_flight_after_training": in_flight_after}


def resume_and_train(strategy: str, ep: int, steps: int, checkpoint: str) -> Dict:
    """Load `checkpoint` into this layout and train to `steps` -> the numbers and the extras."""
    cfg = tiny_config()
    model = build(cfg, strategy, ep)
    opt = optimizer(model)
    extras = Checkpointer(Path(checkpoint).parent.parent, 2, False).load(Path(checkpoint), model, opt)
    return {"extras": {k: v for k, v in extras.items()},
            "numbers": [step(model, opt, b) for b in batches(cfg, steps)[extras["step"]:]]}
