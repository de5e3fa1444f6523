"""Processes: one, or many under torchrun (DDP). Only rank 0 writes files or logs.

Hydra and torchrun: every rank would evaluate `${now:}` and make its own output directory
(hydra #2070). Ranks > 0 therefore compose quietly in the working directory, and rank 0
broadcasts the one run directory that the whole job writes into.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from h64lm.config import HardwareConfig
from h64lm.cpu_malloc import keep_freed_memory
from h64lm.validation import ConfigError

__all__ = [
    "Dist",
    "init_distributed",
    "quiet_hydra_on_nonzero_ranks",
    "export_slurm_ranks",
    "broadcast_object",
    "PeerFailure",
    "is_peer_failure",
    "seed_everything",
]


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def quiet_hydra_on_nonzero_ranks(argv: list[str] | None = None) -> None:
    """Before Hydra parses argv: ranks > 0 make no output directory and no log files."""
    argv = sys.argv if argv is None else argv
    if _env_rank() > 0:
        argv += [
            "hydra.output_subdir=null",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
            "hydra.run.dir=.",
        ]


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def export_slurm_ranks() -> None:
    """Under `hydra/launcher=slurm` with tasks_per_node > 1, each SLURM task is one rank: set the
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT that torchrun would have set."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(hw: HardwareConfig) -> Dist:
    export_slurm_ranks()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = _env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if hw.distributed and "RANK" not in os.environ:
        preset = f"hardware={hw.strategy}"  # the preset that sets this strategy (conf/hardware/)
        raise ConfigError(
            f"{preset} needs a torchrun launch: torchrun --nproc_per_node=N run.py {preset} "
            "(or use hardware=auto for one process)"
        )
    device = _resolve_device(hw.device, local_rank)
    if device.type == "cpu" and hw.num_threads:
        torch.set_num_threads(hw.num_threads)
    if device.type == "cpu" and hw.keep_freed_memory:
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = hw.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=hw.timeout_s))
    return Dist(rank=rank, world_size=world_size, device=device)


class PeerFailure(RuntimeError):
    """A collective failed because another rank died; this rank's state is not at fault."""


def is_peer_failure(e: RuntimeError) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "timed out", "Timeout"))


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
