"""One training micro-batch as every loader yields it and every objective reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Batch", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label of a position that has no target (prompt tokens, padding, a document's last token)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] token ids
    labels: torch.Tensor  # [B, T] next-token targets aligned with input_ids; IGNORE_INDEX = no target
    # [B, T] packed documents: attention and positions restart where it changes; None = one per row
    document_ids: Optional[torch.Tensor] = None
    # what a stage's objective reads besides tokens, each [B] or [B, T]: e.g. a preference pair's
    # rows, a rollout's advantages and the sampling policy's log-probs
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # [B] how many input positions of each row hold a real token, set by whatever pads (packed
    # windows' tails, preference rows, rollouts' left-padded prompts and post-EOS columns);
    # None = no padding. What the trainer's `tokens` counts (`num_inputs`).
    real_tokens: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.labels), move(self.document_ids),
                     {k: move(v) for k, v in self.extras.items()}, move(self.real_tokens))

    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def num_inputs(self) -> int:
        """The input positions a forward of this batch processes, padding left out."""
        return self.input_ids.numel() if self.real_tokens is None else int(self.real_tokens.sum())
