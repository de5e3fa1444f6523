"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""

from __future__ import annotations

import time

import torch

__all__ = ["GPU_PEAK_TFLOPS", "peak_flops", "measure_matmul_flops"]

# Dense (not 2:4 sparse) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "4090": 165.0,
}


def measure_matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, seconds: float = 0.3,
                         device: torch.device | str = "cpu") -> float:
    """FLOP/s of a plain n x n matrix product: the practical peak this process can reach."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up: thread pool and caches
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: the override, a datasheet value for known GPUs, or measured on CPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return None
    return measure_matmul_flops()
