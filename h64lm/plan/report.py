"""A printable plan: the recommended layout's memory breakdown and every layout in one table."""

from __future__ import annotations

from typing import List, Optional

from .layouts import Layout, recommend

__all__ = ["format_plan", "launch_command"]


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def launch_command(layout: Layout, model: str, gpus_per_node: int = 8) -> str:
    """The torchrun command of a layout (hardware.strategy / hardware.ep are the parallel
    engineer's keys; checkpointing is model.gradient_checkpointing)."""
    keys = (f"model={model} hardware.strategy={layout.strategy} hardware.ep={layout.ep} "
            f"model.gradient_checkpointing={str(layout.checkpointing).lower()}")
    if layout.gpus == 1:
        return f"python run.py hardware=gpu {keys}"
    per_node = min(layout.gpus, gpus_per_node)
    nodes = layout.gpus // per_node
    rdzv = (f" --nnodes={nodes} --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500"
            if nodes > 1 else "")
    return f"torchrun{rdzv} --nproc_per_node={per_node} run.py hardware=ddp {keys}"


def format_plan(layouts: List[Layout], model: str = "model",
                gpu_mem_gb: Optional[float] = None) -> str:
    """Recommended layout first (with its breakdown and command), then all layouts."""
    lines = []
    best = recommend(layouts)
    first = layouts[0]
    lines.append(f"{model}: {first.gpus} GPU(s), {first.tokens_per_step:,} tokens/step, "
                 f"{first.flops_per_step / 1e15:.2f} PFLOP/step (model FLOPs)")
    if best is None:
        lines.append(f"no layout fits in {gpu_mem_gb} GB: lower micro_batch or seq_len, or add GPUs")
    else:
        time = f"{best.time_s:.3f} s/step" if best.time_s is not None else "time: pass peak and mfu"
        lines.append(f"recommended: {best.name}  {_gb(best.total)} GB/GPU  {time}")
        lines.append(f"  params {_gb(best.params)}  grads {_gb(best.grads)}  "
                     f"optimizer {_gb(best.optimizer)}  buffers {_gb(best.buffers)}  "
                     f"activations {_gb(best.activations)} (GB)")
        lines.append(f"  {launch_command(best, model)}")
    lines.append("")
    lines.append(f"{'layout':<24}{'GB/GPU':>8}{'fits':>6}{'s/step':>9}{'comm GB':>9}")
    for x in layouts:
        fits = "-" if x.fits is None else ("yes" if x.fits else "no")
        time = "-" if x.time_s is None else f"{x.time_s:.3f}"
        lines.append(f"{x.name:<24}{_gb(x.total):>8}{fits:>6}{time:>9}{_gb(x.comm_bytes):>9}")
    return "\n".join(lines)
