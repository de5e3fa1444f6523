"""Building the trainer's model in every layout, and the sharded checkpoints of FSDP2 / expert
parallelism (h64lm/parallel) under torchrun.

- every run (one process, DDP, FSDP, EP) builds its model the same way: on the meta device,
  activation checkpointing wraps each block first (as torchtitan does, so FSDP's units are the
  checkpointed blocks), then experts are split (EP), the blocks sharded (FSDP) and each rank
  materialises its shard of the weights a one-process run would start from (`build_model`);
- bf16 on GPU under FSDP is FSDP's MixedPrecisionPolicy (bf16 compute copies of fp32 master
  weights, fp32 gradient reduction) instead of autocast;
- checkpoints are DCP directories (`ShardedCheckpoints`): `step_NNNNNNN/`, `best/`, and `last`
  naming the newest; every rank writes its shards and `extras/rank_R.pt` (the plain data of
  `Trainer.state_dict()`), optionally in the background (`train.async_save`);
- a one-process checkpoint file resumes here through `load_file_state` (each rank keeps its
  slices of the full state), and a sharded directory resumes in one process through DCP's
  no-dist load (`load_sharded` on a plain model).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from h64lm.config import RunConfig
from h64lm.model import H64LMForCausalLM
from h64lm.parallel import ParallelLayout, SaveHandle, build_mesh, build_parallel_model, save_sharded
from h64lm.train.checkpoint import load_model_state, remove_entry, step_entries
from h64lm.train.distributed import Dist
from h64lm.train.optim import build_optimizer
from h64lm.train.precision import Precision
from h64lm.train.wrap import apply_activation_checkpointing

__all__ = ["build_model", "ShardedCheckpoints", "load_file_state"]


def build_model(run: RunConfig, layout: ParallelLayout, d: Dist, precision: Precision,
                prepare: Optional[Callable[[nn.Module], None]] = None) -> tuple[nn.Module, nn.Module, bool]:
    """Every layout, one process included, through the parallel layer. `prepare(model)` edits the
    full model before it is split (train.init_from). -> (model for evaluation, sampling and
    checkpoints; the module the training step calls; whether FSDP applies bf16 itself, so
    autocast must stay off)."""
    hw = run.hardware
    mesh = build_mesh(layout, d.device.type) if d.enabled else None

    def build() -> nn.Module:
        model = H64LMForCausalLM(run.model)
        if run.model.gradient_checkpointing:
            apply_activation_checkpointing(model)
        return model

    fsdp_bf16 = layout.strategy == "fsdp" and d.enabled and d.device.type == "cuda" and precision.name == "bf16"
    wrapped = build_parallel_model(build, layout, mesh, run.train.seed, d.device,
                                   param_dtype=torch.bfloat16 if fsdp_bf16 else torch.float32,
                                   reshard_after_forward=hw.reshard_after_forward, prepare=prepare)
    model = wrapped.module if isinstance(wrapped, DDP) else wrapped
    return model, torch.compile(wrapped) if hw.compile else wrapped, fsdp_bf16


def load_file_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    run: RunConfig) -> None:
    """Collective: a one-process checkpoint file's model and optimizer state into the sharded
    `model` / `optimizer`. Each rank (every rank has read the file) loads it into a plain CPU model
    and optimizer to name the optimizer state by parameter (the file indexes it by position), and
    keeps its own slices of the full tensors."""
    plain = H64LMForCausalLM(run.model)
    load_model_state(plain, state["model"])
    plain_opt = build_optimizer(plain, run.optim, torch.device("cpu"))
    plain_opt.load_state_dict(state["optimizer"])
    model_sd, optim_sd = get_state_dict(plain, plain_opt)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def _link_tree(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of directory `src` made of hard links (no bytes copied)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=os.link)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


class ShardedCheckpoints:
    """Sharded step directories with `last` and `best/`, keeping the newest `keep_last` step
    entries (files of an earlier one-process layout included). Every method is collective."""

    def __init__(self, run_dir: Path, keep_last: int, d: Dist):
        self.dir, self.keep_last, self.d = Path(run_dir) / "checkpoints", keep_last, d
        self.pending: SaveHandle | None = None

    def step_path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, extras: dict[str, Any],
             step: int, background: bool) -> Path:
        """With `background`, the shards are staged and written while training goes on; the
        directory appears (and `last` moves) at the next save or `wait()`."""
        self.wait()
        self.pending = save_sharded(self.step_path(step), model, optimizer, extras, async_save=background)
        if not background:
            self.wait()
        return self.step_path(step)

    def wait(self) -> None:
        """Finish the save in flight: directory in place, `last` names it, old entries pruned."""
        if self.pending is None:
            return
        path = self.pending.wait()
        self.pending = None
        if self.d.is_main:
            pointer = self.dir / f".last.tmp-{os.getpid()}"
            pointer.write_text(path.name + "\n")
            os.replace(pointer, self.dir / "last")
            remove_entry(self.dir / "last.pt")  # an earlier one-process layout's, now older
            for _, old in step_entries(self.dir)[self.keep_last:]:
                remove_entry(old)

    def save_best(self, model: nn.Module, optimizer: torch.optim.Optimizer, extras: dict[str, Any],
                  step: int) -> Path:
        """`best/`: hard links to this step's directory when it was saved, else a new save."""
        self.wait()
        best = self.dir / "best"
        if self.step_path(step).is_dir():
            if self.d.is_main:
                _link_tree(self.step_path(step), best)
            if self.d.enabled:
                dist.barrier()
        else:
            save_sharded(best, model, optimizer, extras)
        if self.d.is_main:
            remove_entry(self.dir / "best.pt")
        return best
