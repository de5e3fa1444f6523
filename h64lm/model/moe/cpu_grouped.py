"""Grouped expert products on the CPU, parallel over experts instead of inside each product.

torch 2.13's CPU `_grouped_mm` runs one matrix product per expert, each split across the
intra-op threads. With many experts every product is small (64 experts, top-2, 2,048 tokens: ~64
rows each), and two threads meeting at the end of each of ~1,500 products per step cost more than
they save (docs/performance.md, expert scaling). Here each thread of a small pool takes a
contiguous range of experts holding about an equal share of the rows and runs their products one
after another on one core, so the threads meet once per grouped product.

Each product is one single-threaded `torch.mm` of an expert's slice, so the values are those of
the per-expert loop run on one thread, bit for bit, whichever worker runs the expert and however
many there are (tests/model/test_moe_cpu_grouped.py); against `_grouped_mm` on several threads they
may differ in the last bits, as any change of thread count may. `experts.grouped_matmul` decides
when this path runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

__all__ = ["threaded_grouped_mm"]

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != threads:
        if _pool is not None:
            _pool[1].shutdown(wait=True)
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="h64lm-experts"))
    return _pool[1]


def _ranges(bounds: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous expert ranges [lo, hi) with about rows / parts rows each (bounds: E + 1 row
    offsets starting at 0)."""
    experts, rows = len(bounds) - 1, bounds[-1]
    cuts, e = [0], 0
    for p in range(1, parts):
        while e < experts and bounds[e] < rows * p / parts:
            e += 1
        cuts.append(max(e, cuts[-1]))
    cuts.append(experts)
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def _run(bounds: list[int], threads: int, product: Callable[[int, int, int], None]) -> None:
    """product(e, row_lo, row_hi) for every expert, the experts split over `threads` threads."""
    def work(lo: int, hi: int) -> None:
        torch.set_num_threads(1)  # OpenMP's count is per thread: this worker's products run on one core
        with torch.no_grad():  # grad mode is per thread too; the autograd.Function owns the graph
            for e in range(lo, hi):
                product(e, bounds[e], bounds[e + 1])

    try:
        for future in [_executor(threads).submit(work, lo, hi) for lo, hi in _ranges(bounds, threads)]:
            future.result()
    finally:
        # torch also keeps the last count set by any thread for threads that start computing later
        # (and for a caller that has not computed yet): put the caller's back
        torch.set_num_threads(threads)


def _rows_times(x: torch.Tensor, w: torch.Tensor, bounds: list[int], threads: int) -> torch.Tensor:
    """x [M, a] rows sorted by expert, w [E, a, b] -> [M, b]: rows of expert e times w[e]."""
    out = x.new_empty(x.shape[0], w.shape[-1])

    def product(e: int, lo: int, hi: int) -> None:
        if hi > lo:
            torch.mm(x[lo:hi], w[e], out=out[lo:hi])

    _run(bounds, threads, product)
    return out


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, bounds: list[int], threads: int) -> torch.Tensor:
    """x [M, a], dy [M, b] -> [E, a, b]: x_e^T dy_e per expert, zero for an expert without rows."""
    grad = x.new_empty(len(bounds) - 1, x.shape[1], dy.shape[1])

    def product(e: int, lo: int, hi: int) -> None:
        if hi > lo:
            torch.mm(x[lo:hi].t(), dy[lo:hi], out=grad[e])
        else:
            grad[e].zero_()

    _run(bounds, threads, product)
    return grad


class _ThreadedGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, threads: int) -> torch.Tensor:
        bounds = [0, *offsets.tolist()]
        ctx.save_for_backward(x, w)
        ctx.bounds, ctx.threads = bounds, threads
        return _rows_times(x, w, bounds, threads)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _rows_times(dy, w.transpose(1, 2), ctx.bounds, ctx.threads)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, dy, ctx.bounds, ctx.threads)
        return dx, dw, None, None


def threaded_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                        threads: int) -> torch.Tensor:
    """x [M, a] rows sorted by expert, w [E, a, b], offsets [E] (cumulative row counts, the last
    = M) -> [M, b], with the experts' products spread over `threads` single-threaded workers."""
    return _ThreadedGroupedMM.apply(x, w, offsets, threads)
