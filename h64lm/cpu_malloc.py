"""CPU training steps on a heap that keeps freed memory, so large tensors stop costing page faults.

torch's CPU allocator takes its memory from glibc's malloc, which serves every request above its
mmap threshold (at most 32 MiB on 64-bit Linux) with a fresh `mmap` and hands it back to the
kernel on `free`. A training step allocates and frees the same large activations, gradients and
logit chunks every step, so every step pays the kernel to map, zero-fill (one page fault per 4
KiB) and unmap them again. With malloc's mmap use off and its trim threshold at its largest, freed
blocks stay in the heap and the next step reuses them. Measured on the 249M step, 2 threads, other
processes paused: 6.1 s -> 5.1 s per step at the same peak resident memory (docs/performance.md).
The price: the process keeps its peak memory until it exits (`hardware.keep_freed_memory=false`
gives it back, at the old speed). Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["M_MMAP_MAX", "M_TRIM_THRESHOLD", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_LARGEST_INT = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory(libc_name: str = "libc.so.6") -> bool:
    """Turn off malloc's mmap for large blocks and its trimming; True when both took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _LARGEST_INT) == 1
