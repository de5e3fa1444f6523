"""Measurement primitives for `experiments/bench.py`: alternating timings, step peak memory,
the matrix-product peak, and one training step / one generation call for either model."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch

from h64lm.objectives.lm import lm_loss

__all__ = ["alternate", "forward_loss", "generate_call", "matmul_peak", "step_peak_bytes",
           "synchronize", "train_step"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(candidates: dict[str, Callable[[], object]], warmup: int, rounds: int,
              device: torch.device) -> dict[str, float]:
    """Seconds per call, the median of `rounds` calls of each candidate, run A B C A B C ... so
    that drifting load on a shared machine hits every candidate alike. Warm-up calls (allocator,
    kernels, compilation) are run first, also alternating, and not counted."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                seconds: float = 1.0) -> float:
    """FLOP/s of a plain [m, k] @ [k, n] product, repeated for `seconds`: the practical peak a
    step whose largest GEMM has this shape could reach on this machine."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    synchronize(device)
    iters, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        iters += 1
    synchronize(device)
    return 2 * m * k * n * iters / (time.perf_counter() - started)


def step_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of `fn` above what was allocated before it
    (activations, gradients, temporaries; not the parameters or optimizer state already held).

    CUDA: the caching allocator's counters. CPU has no such counter, so the profiler records
    every allocation and free and the running sum's maximum is taken.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw event list keeps one record per allocation (+bytes) and per free (-bytes)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hf: bool,
                 dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The training loss, graph attached. Labels `y` are aligned with `x` (y[t] = x[t + 1]);
    Mixtral would shift them again, so it gets them as `shift_labels`. Both compute their router
    load-balancing loss (ours also the z-loss), so neither skips work the other does."""

    def loss() -> torch.Tensor:
        with _autocast(x.device, dtype):
            if hf:
                return model(input_ids=x, labels=y, shift_labels=y,
                             output_router_logits=True).loss
            return lm_loss(model(x, labels=y, return_logits=False), model.config)

    return loss


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, hf: bool, dtype: torch.dtype) -> Callable[[], None]:
    """One forward + backward + AdamW step."""
    loss_fn = forward_loss(model, x, y, hf, dtype)

    def step() -> None:
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate_call(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, hf: bool,
                  dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Greedy decoding of exactly `new_tokens` tokens with a KV cache, no early stop."""
    device = prompt.device

    def call() -> torch.Tensor:
        with torch.no_grad(), _autocast(device, dtype):
            if hf:
                return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
            return model.generate(prompt, new_tokens, temperature=0.0)

    return call


# Op name -> where a step spends its time; the first matching rule wins.
PROFILE_CATEGORIES = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm",
                         "aten::_grouped_mm", "aten::baddbmm")),
    ("attention kernel", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("optimizer", ("adam", "_foreach_")),
    ("softmax", ("aten::_softmax", "aten::_log_softmax", "softmax_backward")),
    ("copies and indexing", ("aten::cat", "aten::copy_", "aten::fill_", "aten::index",
                             "aten::scatter", "aten::gather", "aten::zero_", "aten::clone",
                             "aten::embedding", "aten::roll", "aten::sort", "aten::_to_copy")),
)


def profile_step(fn: Callable[[], object]) -> dict[str, float]:
    """Self time (seconds) of one call of `fn` per category of PROFILE_CATEGORIES, the remainder
    under "elementwise and other"; from torch.profiler (CPU ops, or their launches on GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    totals["elementwise and other"] = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # autograd/optimizer wrappers: their ops are counted themselves
        key = event.key.lower()
        category = next((name for name, patterns in PROFILE_CATEGORIES
                         if any(p.lower() in key for p in patterns)), "elementwise and other")
        totals[category] += event.self_cpu_time_total / 1e6
    return totals
