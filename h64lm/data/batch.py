"""One training micro-batch as every loader yields it and every objective reads it."""

from __future__ import annotations

from dataclasses import dataclass
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

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.labels, self.document_ids)))

    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
