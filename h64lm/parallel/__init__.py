"""Parallelism applied from outside the model: device mesh, FSDP2, expert parallelism, DDP,
meta-device materialisation, cross-mesh gradient clipping. Sharded checkpoints outside the
trainer live with the other checkpoints: h64lm/runtime/checkpoint/sharded.py."""

from .ddp import apply_ddp
from .expert_parallel import ExpertParallel, all_to_all, apply_expert_parallel
from .fsdp import apply_fsdp
from .grad import clip_grad_norm_
from .init import materialize
from .layout import STRATEGIES, ParallelLayout
from .mesh import ParallelMesh, build_mesh
from .setup import build_parallel_model

__all__ = [
    "ParallelLayout", "ParallelMesh", "build_mesh", "build_parallel_model", "STRATEGIES",
    "apply_fsdp", "apply_ddp", "apply_expert_parallel", "ExpertParallel", "all_to_all",
    "materialize", "clip_grad_norm_",
]
