"""Prompts with reference answers for the RL stage: a resumable loader of left-padded chat prompts.

A prompt is every turn of a conversation before its last assistant turn, encoded by `ChatFormat`
(ends with `▁[/INST]`); the last assistant turn is kept as the reference the reward compares with.
The loader yields prompt micro-batches; the RL objective turns them into rollouts.

Order: the prompts are shuffled once per epoch with (seed, epoch) and read as one global stream.
Optimizer step s takes P = B * M * W prompts (B = train.batch_size, M micro-batches per rank, W
ranks) from position s * P; micro-batch m of rank r holds positions s * P + (r * M + m) * B + [0, B).
So the step's micro-batches are the same whatever the split between M and W, and each row carries
its global stream `position` (extras), from which the rollout seeds its sampling: two processes
sample exactly what one process with twice the micro-batches samples. The state is the number of
micro-batches this rank has taken, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch

__all__ = ["Prompt", "PromptLoader", "left_padded"]


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # the chat prompt's token ids, ending where the answer starts
    reference: str  # the reference answer's text (the conversation's last assistant turn)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids [B, L], attention_mask [B, L]): every prompt ends at the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


class PromptLoader:
    """Micro-batches of `batch_size` prompts for rank `rank` of `world_size`, `micro_batches` per
    optimizer step. Batch: input_ids [B, L] left-padded with `pad_id`, labels [B, L] all ignored (a
    prompt has no target), extras "attention_mask" [B, L], "prompt" [B] (index into `prompts`),
    "position" [B] (the row's place in the global prompt stream)."""

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, micro_batches: int, seed: int,
                 rank: int, world_size: int, pad_id: int):
        if not prompts:
            raise ValueError("the prompt loader has no prompts")
        self.prompts, self.batch_size, self.micro_batches = prompts, batch_size, micro_batches
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        self.taken = 0  # micro-batches this rank has yielded
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def _index(self, position: int) -> int:
        epoch, at = divmod(position, len(self.prompts))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.prompts)))
        return int(self._order[1][at])

    def next_batch(self) -> Batch:
        step, micro = divmod(self.taken, self.micro_batches)
        per_step = self.batch_size * self.micro_batches * self.world_size
        start = step * per_step + (self.rank * self.micro_batches + micro) * self.batch_size
        positions = list(range(start, start + self.batch_size))
        indices = [self._index(p) for p in positions]
        ids, mask = left_padded([self.prompts[i].ids for i in indices], self.pad_id)
        self.taken += 1
        return Batch(ids, torch.full_like(ids, IGNORE_INDEX),
                     extras={"attention_mask": mask, "prompt": torch.tensor(indices),
                             "position": torch.tensor(positions)}, real_tokens=mask.sum(1))

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = int(state["taken"])
