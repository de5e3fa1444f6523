"""Measure what the planner predicts, on any device: saved-for-backward bytes, bytes still alive
after forward, and the bytes of parameters, gradients and optimizer state after one step.

Used by tests/plan to check the planner; also handy on a GPU (`measure_*` take any model/batch).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SavedBytes", "measure_saved", "measure_retained", "measure_state", "autocast_for"]

# grad_fn types that turn a parameter into a same-data copy or view (autocast's weight cast, .t())
_WEIGHT_VIEWS = ("ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
                 "ViewBackward0", "ExpandBackward0")


def _from_parameter(t: torch.Tensor) -> bool:
    """True when `t` is a parameter seen through casts and views only (a weight copy)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _WEIGHT_VIEWS:
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad"


def autocast_for(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@dataclass
class SavedBytes:
    activations: int  # distinct storages saved for backward that are neither weights nor copies
    weight_copies: int  # low-precision copies of parameters saved for backward (autocast)


def measure_saved(forward: Callable[[], torch.Tensor], parameters) -> SavedBytes:
    """Run `forward()` under saved-tensor hooks and sum each distinct saved storage once (a view
    keeps its whole storage alive, so storages, not tensor sizes, are what memory holds)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
    seen: Dict[int, bool] = {}  # storage pointer -> is a weight copy

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = _from_parameter(t)
            sizes[ptr] = t.untyped_storage().nbytes()
        return t

    sizes: Dict[int, int] = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return SavedBytes(activations=sum(n for p, n in sizes.items() if not seen[p]),
                      weight_copies=sum(n for p, n in sizes.items() if seen[p]))


class _LiveStorages(TorchDispatchMode):
    """Tracks the bytes of every storage created under it until that storage is freed."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view (or in-place op) shares an input's storage: nothing new was allocated
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key not in self.live and st.nbytes() and st.data_ptr() not in inputs:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key)
        return out


def measure_retained(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes created during `forward()` that are still alive after it returns (the activations
    autograd holds, whatever hooks checkpointing installs), excluding the returned loss."""
    with _LiveStorages() as live:
        loss = forward()
    retained = live.current - loss.untyped_storage().nbytes()
    loss.backward()  # frees the graph
    return retained


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  forward: Callable[[], torch.Tensor]) -> Dict[str, int]:
    """Bytes of parameters, of gradients after one backward, and of optimizer state after one
    step (every tensor in `optimizer.state`)."""
    params = list(model.parameters())  # distinct: a tied weight appears once
    forward().backward()
    grads = _tensor_bytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    state = _tensor_bytes(v for s in optimizer.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor))
    return {"params": _tensor_bytes(params), "grads": grads, "optimizer": state}
