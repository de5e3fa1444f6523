"""A printable plan: the recommended layout's memory breakdown and every layout in one table.

Sizes are printed in engineering units (kB ... EB, kFLOP ... ZFLOP) and times in the unit that
suits them, and the table's columns are as wide as their widest entry, so an absurd model
(20,000 layers, hidden 65,536) still gives a readable table.
"""

from __future__ import annotations

import shlex
from typing import List, Optional, Sequence

from .layouts import Layout, recommend

__all__ = ["format_plan", "launch_command", "engineering", "duration", "table"]

_PREFIXES = ("", "k", "M", "G", "T", "P", "E", "Z", "Y")


def engineering(value: float, unit: str, digits: int = 3) -> str:
    """12_400_000_000 'B' -> '12.4 GB': 3 significant digits, a prefix every factor 1000."""
    exponent = 0
    while abs(value) >= 999.5 and exponent < len(_PREFIXES) - 1:
        value, exponent = value / 1000, exponent + 1
    if abs(value) >= 999.5:  # beyond yotta: plain scientific notation
        return f"{value * 1000 ** exponent:.{digits - 1}e} {unit}"
    return f"{value:.{digits}g} {_PREFIXES[exponent]}{unit}"


def duration(seconds: float) -> str:
    """Seconds in the unit a reader thinks in: '0.156 ms', '4.12 s', '3.5 min', '12.1 h', '41.7 days'."""
    for size, unit in ((86400 * 365.25, "years"), (86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= 2 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Lines of a table whose columns are as wide as their widest cell (the first left-aligned,
    the others right-aligned), two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in [header, *rows]]


def launch_command(layout: Layout, model: str, gpus_per_node: int = 8, overrides: Sequence[str] = ()) -> str:
    """The torchrun command of a layout (hardware.strategy / hardware.ep are the parallel
    engineer's keys; checkpointing is model.gradient_checkpointing), then `overrides` (the
    user's own keys), shell-quoted so that the line runs when pasted."""
    keys = (f"model={model} hardware.strategy={layout.strategy} hardware.ep={layout.ep} "
            f"model.gradient_checkpointing={str(layout.checkpointing).lower()}")
    keys += "".join(f" {shlex.quote(o)}" for o in overrides)
    if layout.gpus == 1:
        return f"python run.py hardware=gpu {keys}"
    per_node = min(layout.gpus, gpus_per_node)
    nodes = layout.gpus // per_node
    rdzv = (f" --nnodes={nodes} --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500"
            if nodes > 1 else "")
    return f"torchrun{rdzv} --nproc_per_node={per_node} run.py hardware=ddp {keys}"


def format_plan(layouts: List[Layout], model: str = "model", gpu_mem_gb: Optional[float] = None,
                gpus_per_node: int = 8, overrides: Sequence[str] = ()) -> str:
    """Recommended layout first (with its breakdown and command, `overrides` appended), then all
    layouts."""
    lines = []
    best = recommend(layouts)
    first = layouts[0]
    lines.append(f"{model}: {first.gpus} GPU(s), {first.tokens_per_step:,} tokens/step, "
                 f"{engineering(first.flops_per_step, 'FLOP')}/step (model FLOPs)")
    if best is None:
        lines.append(f"no layout fits in {gpu_mem_gb} GB: lower micro_batch or seq_len, or add GPUs")
    else:
        time = f"{duration(best.time_s)}/step" if best.time_s is not None else "time: pass peak and mfu"
        lines.append(f"recommended: {best.name}  {engineering(best.total, 'B')}/GPU  {time}")
        lines.append("  " + "  ".join(f"{part} {engineering(getattr(best, part), 'B')}" for part in
                                      ("params", "grads", "optimizer", "buffers", "activations")))
        lines.append(f"  {launch_command(best, model, gpus_per_node, overrides)}")
    lines.append("")
    rows = [[x.name, engineering(x.total, "B"), "-" if x.fits is None else ("yes" if x.fits else "no"),
             "-" if x.time_s is None else duration(x.time_s), engineering(x.comm_bytes, "B")]
            for x in layouts]
    lines += table(["layout", "memory/GPU", "fits", "time/step", "comm/step"], rows)
    return "\n".join(lines)
