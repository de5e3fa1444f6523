"""Memory and time planner: per-GPU bytes, tokens, FLOPs and time per step of a training layout
(DDP or FSDP2, expert parallelism, activation checkpointing), and the cheapest layout that fits.

    python -m h64lm.plan model=moe_7b gpus=8 gpu_mem_gb=80 seq_len=4096 micro_batch=1
"""

from .activations import ActivationBytes, activation_bytes
from .layouts import DEFAULT_HEADROOM, Layout, plan_layout, plan_layouts, recommend
from .params import StateBytes, state_bytes
from .report import format_plan, launch_command

__all__ = ["ActivationBytes", "activation_bytes", "DEFAULT_HEADROOM", "Layout", "plan_layout",
           "plan_layouts", "recommend", "StateBytes", "state_bytes", "format_plan",
           "launch_command"]
