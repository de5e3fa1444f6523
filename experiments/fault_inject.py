"""Run `run.py` with a fault hook: `python experiments/fault_inject.py run.py [overrides ...]`.

The hooks only change timing, never numerics, so a run under them trains exactly like a plain
`python run.py` (that is what lets a killed run be compared with an uninterrupted one):

  H64LM_FAULT_STEP_DELAY=S     sleep S seconds before every optimizer step, so a killer can aim
                               at a moment of a run that would otherwise finish too fast.
  H64LM_FAULT_SAVE_MARKER=F    on the first checkpoint write after step H64LM_FAULT_SAVE_AFTER
                               (default 0): write part of the file, create F, then hang, so the
                               process is killed with a half-written checkpoint on disk.
  H64LM_FAULT_ENOSPC_FROM=N    every checkpoint write from step N on fails with ENOSPC inside
                               DCP's shard writer (a disk that filled up and stays full).
  H64LM_FAULT_WRITE_DELAY=S    every shard write sleeps S seconds first (in the writer's
                               thread), so a background save stays in flight across steps.
  H64LM_FAULT_EVAL_DELAY=S     sleep S seconds before every validation batch (a long evaluation).
  H64LM_FAULT_EVAL_MARKER=F    create F when the first evaluation starts, so a signal can be
                               aimed into it.

It also works as torchrun's training script (every rank gets the same hooks).
In-process faults (non-finite losses and gradients) are `poison_training_forward`.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["install_hooks", "poison_training_forward"]


def _delay_steps(seconds: float) -> None:
    from h64lm.train.loop import Trainer

    step = Trainer.train_step

    def slow_step(self, *args, **kwargs):
        time.sleep(seconds)
        return step(self, *args, **kwargs)

    Trainer.train_step = slow_step


def _hang_inside_save(marker: Path, after_step: int) -> None:
    from h64lm.runtime.checkpoint import checkpointer

    write_shards = checkpointer.write_shards

    def hanging_write(state, tmp, group, background):
        if int(tmp.name.split("_")[1].split(".")[0]) <= after_step:  # `.step_NNNNNNN.tmp`
            return write_shards(state, tmp, group, background)
        with open(tmp / "__0_0.distcp", "wb") as f:
            f.write(b"\0" * 4096)  # the start of a shard, never finished
            f.flush()
            os.fsync(f.fileno())
        marker.write_text(f"{os.getpid()} {tmp}\n")
        time.sleep(3600)

    checkpointer.write_shards = hanging_write


def _full_disk_from(step: int) -> None:
    import errno

    from torch.distributed.checkpoint import filesystem

    write_item = filesystem._write_item

    def failing(transforms, stream, *args, **kwargs):
        name = str(getattr(stream, "name", ""))
        saving = [p for p in Path(name).parts if p.startswith(".step_")]
        if saving and int(saving[0][len(".step_"):].split(".")[0]) >= step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return write_item(transforms, stream, *args, **kwargs)

    filesystem._write_item = failing


def _slow_writes(seconds: float) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def slow(self, plan, planner):
        time.sleep(seconds)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = slow


def _slow_evaluation(seconds: float, marker: Path | None) -> None:
    from h64lm.eval import validation

    evaluate = validation.evaluate

    def slow_evaluate(model, windows, batch_size, precision, d, should_stop):
        if marker is not None and not marker.exists():
            marker.write_text(f"{os.getpid()} {len(windows)} windows\n")

        def sleep_then_ask() -> bool:
            time.sleep(seconds)
            return should_stop()

        return evaluate(model, windows, batch_size, precision, d, sleep_then_ask)

    validation.evaluate = slow_evaluate


def poison_training_forward(loss_steps: Collection[int] = (), grad_steps: Collection[int] = (),
                            value: float = float("nan")) -> Callable[[], None]:
    """From now on, training forward number k (1-based; = step k without accumulation) returns a
    loss times `value` if k is in `loss_steps`, or a finite loss whose gradients are all `value`
    if k is in `grad_steps`. Evaluation and sampling stay clean. Returns the undo function."""
    import torch

    from h64lm.model import H64LMForCausalLM

    class PoisonGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, value)

    forward = H64LMForCausalLM.forward
    calls = [0]

    def poisoned(self, input_ids, labels=None, **kwargs):
        out = forward(self, input_ids, labels=labels, **kwargs)
        if labels is None or not torch.is_grad_enabled():
            return out
        calls[0] += 1
        # the objective builds the loss from the cross-entropy (the model's `loss` is not read)
        if calls[0] in loss_steps:
            out.ce = out.ce * value
        if calls[0] in grad_steps:
            out.ce = PoisonGrad.apply(out.ce)
        return out

    H64LMForCausalLM.forward = poisoned

    def undo() -> None:
        H64LMForCausalLM.forward = forward

    return undo


def install_hooks(env: dict[str, str]) -> None:
    if env.get("H64LM_FAULT_STEP_DELAY"):
        _delay_steps(float(env["H64LM_FAULT_STEP_DELAY"]))
    if env.get("H64LM_FAULT_SAVE_MARKER"):
        _hang_inside_save(Path(env["H64LM_FAULT_SAVE_MARKER"]),
                          int(env.get("H64LM_FAULT_SAVE_AFTER", "0")))
    if env.get("H64LM_FAULT_ENOSPC_FROM"):
        _full_disk_from(int(env["H64LM_FAULT_ENOSPC_FROM"]))
    if env.get("H64LM_FAULT_WRITE_DELAY"):
        _slow_writes(float(env["H64LM_FAULT_WRITE_DELAY"]))
    if env.get("H64LM_FAULT_EVAL_DELAY") or env.get("H64LM_FAULT_EVAL_MARKER"):
        marker = env.get("H64LM_FAULT_EVAL_MARKER")
        _slow_evaluation(float(env.get("H64LM_FAULT_EVAL_DELAY", "0")), Path(marker) if marker else None)


if __name__ == "__main__":
    script, *args = sys.argv[1:]
    install_hooks(dict(os.environ))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
