"""E SwiGLU experts stored as stacked weights, applied to expert-sorted rows.

One [E, ...] parameter per projection: `torch._grouped_mm` multiplies each contiguous slice of rows
by its expert's matrix in one call, so Python does the same work for 64 experts as for 8 (one
kernel on CUDA; on CPU torch still runs one matrix product per expert inside the call, each split
across the threads, so many small products go to `cpu_grouped.threaded_grouped_mm` instead). Where it
is unavailable or unsupported (old torch, unaligned shapes, non-bf16 CUDA, non-bf16 under
torch.compile), a loop over the experts that received rows does the same product."""

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import compute_dtype
from .cpu_grouped import threaded_grouped_mm

__all__ = ["Experts", "THREADED_MAX_ROWS", "THREADED_MIN_ROWS", "grouped_matmul", "swiglu_experts"]


def _aligned(t: torch.Tensor) -> bool:
    return all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) and t.stride()[-1] == 1


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its fake-tensor kernel, which compilation runs, accepts bf16 only
    if x.device.type == "cuda":
        ok_device = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        ok_device = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return ok_device and _aligned(x) and _aligned(w)


# Experts go to threads (h64lm/model/moe/cpu_grouped.py) on the CPU when the products are many and
# small: at most THREADED_MAX_ROWS rows per expert on average, and enough rows that handing work to
# threads pays (not a decoding step). Measured crossover (docs/performance.md, expert scaling):
# ~128 rows per expert on an idle 2-core machine; below it threads win, far more so under load.
THREADED_MAX_ROWS = 128
THREADED_MIN_ROWS = 512


def _many_small_products(x: torch.Tensor, w: torch.Tensor, threads: int) -> bool:
    rows, experts = x.shape[0], w.shape[0]
    return (x.device.type == "cpu" and x.dtype == w.dtype and threads > 1 and experts >= 2 * threads
            and THREADED_MIN_ROWS <= rows <= THREADED_MAX_ROWS * experts
            and not torch.compiler.is_compiling())


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, a] rows sorted by expert, w [E, a, b], offsets [E] int32 (cumulative row counts,
    the last = M) -> [M, b]."""
    threads = torch.get_num_threads()  # the caller's intra-op threads: the split uses as many
    if _many_small_products(x, w, threads):
        return threaded_grouped_mm(x, w, offsets, threads)
    if _grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    return loop_matmul(x, w, offsets)


def loop_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The reference path: one GEMM per expert that received rows. Reading the row counts on the
    host is a device sync; the grouped path above needs none."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    parts = [x_e @ w_e for x_e, w_e, n in zip(x.split(counts), w.unbind(0), counts) if n]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] rows sorted by expert, counts [E] -> [M, hidden] (row m via its expert)."""
        return swiglu_experts(x, self.gate_up_proj, self.down_proj, counts)


def swiglu_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """x [M, hidden] rows sorted by expert, w_gate_up [E, hidden, 2I], w_down [E, I, hidden],
    counts [E] -> [M, hidden]. Also run by the expert-parallel wrapper on its local experts."""
    # autocast does not cover _grouped_mm: cast as it would for a linear layer, so bf16
    # autocast runs the bf16 grouped kernel (the only one on CUDA) instead of the loop
    dtype = compute_dtype(x)
    offsets = counts.cumsum(0, dtype=torch.int32)  # [E]
    gate, up = grouped_matmul(x.to(dtype), w_gate_up.to(dtype), offsets).chunk(2, dim=-1)
    return grouped_matmul(F.silu(gate) * up, w_down.to(dtype), offsets)
