"""What the trainer needs from a stage's data: the loader protocol."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from h64lm.data.batch import Batch

__all__ = ["Loader"]


@runtime_checkable
class Loader(Protocol):
    """A resumable stream of micro-batches for one rank.

    After `load_state_dict(state_dict())` the loader yields exactly the batches it would have
    yielded next (the trainer's bit-exact resume depends on it). `state_dict()` is plain data
    (ints, strings, lists), so it travels in any checkpoint format."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
