"""Run control around the loop: stop signals, the two ways a run ends early, and RNG state.

Every RNG state is captured in checkpoints so a resumed run draws the same numbers as the
uninterrupted one; numpy's key array is stored as a tensor so `weights_only` loading accepts it.
"""

from __future__ import annotations

import contextlib
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["TrainingStopped", "TrainingDiverged", "SignalFlag", "rng_state", "set_rng_state"]


class TrainingStopped(Exception):
    """A SIGINT/SIGTERM arrived; a checkpoint was saved. Exit code: 128 + signal number."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: saved {checkpoint}; continue with train.resume=auto "
            f"hydra.run.dir={checkpoint.parent.parent}"
        )


class TrainingDiverged(Exception):
    """Too many non-finite steps in a row; the last good state was saved."""


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks once per step (a second SIGINT kills)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
