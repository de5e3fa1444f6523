"""Training windows as a pure function of (seed, index, rank, world_size), and fixed val windows.

The token stream is cut into W = (N - 1) // seq_len non-overlapping windows of seq_len + 1
tokens (window w starts at token w * seq_len; consecutive windows share one boundary token, so
every token is a target exactly once). Each epoch visits all windows in a random permutation
seeded by (seed, epoch). Micro-batch `index` of epoch e takes the global batch
perm_e[j*G : (j+1)*G], G = batch_size * world_size, j = index mod batches_per_epoch, and rank r
reads its slice [r*B : (r+1)*B]: ranks never share a window at one index, and the windows left
over by G not dividing W change with each epoch's permutation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from h64lm.data.batch import Batch

__all__ = ["TokenLoader", "check_loader_args", "validation_windows"]


def _num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def check_loader_args(seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                      unit: str) -> None:
    """The arguments every loader shares; `unit` names what the seed orders (window, example)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"data.seq_len={seq_len} and train.batch_size={batch_size} must be >= 1")
    if seed < 0:
        raise ValueError(f"train.seed={seed} must be >= 0 (it seeds the {unit} order)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


class TokenLoader:
    """`batch(index) -> (input_ids[B,T], labels[B,T])`, labels already shifted by one token;
    `next_batch() -> Batch` (the `h64lm.data.protocol.Loader` protocol) walks the indices."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        check_loader_args(seq_len, batch_size, seed, rank, world_size, "window")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = _num_windows(tokens, seq_len)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data.seq_len={seq_len}: the training split has {self.num_windows} windows, "
                f"fewer than one global batch of train.batch_size={batch_size} x "
                f"{world_size} rank(s); lower data.seq_len or train.batch_size, or add text"
            )
        self.index = 0
        self._offsets = np.arange(seq_len + 1)  # [T+1]
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def epoch(self, index: int) -> int:
        return index // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._epoch = rng.permutation(self.num_windows), epoch
        return self._perm

    def window_ids(self, index: int) -> np.ndarray:
        """The windows this rank reads at micro-batch `index`: [B] window numbers."""
        if index < 0:
            raise ValueError(f"loader index={index} must be >= 0")
        epoch, j = divmod(index, self.batches_per_epoch)
        start = j * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_ids(index) * self.seq_len  # [B]
        rows = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)  # [B,T+1]
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def next_batch(self) -> Batch:
        """The next micro-batch: labels are the inputs shifted by one token (every one a target)."""
        input_ids, labels = self.batch(self.index)
        self.index += 1
        return Batch(input_ids, labels)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_windows": self.num_windows, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["index"]`; the rank stays this process's own.

        A different world size is accepted when the global batch is unchanged (each index then
        still covers the same windows); anything else would silently read other data.
        """
        checks = [("seq_len", self.seq_len, "data.seq_len"),
                  ("num_tokens", len(self.tokens), "the training corpus (data.*)"),
                  ("num_windows", self.num_windows, "data.seq_len / the training corpus")]
        for key, now, option in checks:
            if state[key] != now:
                raise ValueError(f"cannot resume the data loader: {key} was {state[key]}, now "
                                 f"{now}; restore {option} as in the checkpoint")
        saved_global = state["batch_size"] * state["world_size"]
        if saved_global != self.global_batch:
            raise ValueError(
                f"cannot resume the data loader: the global batch was {state['batch_size']} x "
                f"{state['world_size']} rank(s), now {self.batch_size} x {self.world_size}; "
                "keep train.batch_size x world size as in the checkpoint"
            )
        self.seed, self.index = state["seed"], state["index"]
        self._epoch = None


def validation_windows(tokens: np.ndarray, seq_len: int,
                       max_windows: int | None = None) -> torch.Tensor:
    """A fixed set of windows, evenly spaced over the split: LongTensor [N, seq_len + 1]."""
    total = _num_windows(tokens, seq_len)
    if total == 0:
        raise ValueError(f"data.seq_len={seq_len}: the validation split has {len(tokens)} "
                         f"tokens, fewer than one window of {seq_len + 1}; lower data.seq_len")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"data.val_windows={max_windows} must be >= 1 or null (every window)")
    count = total if max_windows is None else min(max_windows, total)
    picks = np.linspace(0, total - 1, count).round().astype(np.int64)  # [N], distinct
    starts = picks * seq_len
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(rows)
