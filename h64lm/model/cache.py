"""Key/value cache for incremental decoding.

It stores keys and values after RoPE, with `num_kv_heads` heads only (GQA keeps its memory
saving). With a sliding window W the next query can see at most W - 1 earlier slots, so only the
last W - 1 are kept and the cache stays bounded however long generation runs.
"""

from typing import List, Optional, Tuple

import torch

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, num_layers: int, sliding_window: Optional[int] = None):
        self.keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.keep = None if sliding_window is None else sliding_window - 1
        self.seen = 0  # slots processed so far (absolute position of the next slot)
        self.length = 0  # slots currently stored

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H_kv, T, D] for new slots -> all visible k, v [B, H_kv, length + T, D]."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        start = 0 if self.keep is None else max(k.shape[2] - self.keep, 0)
        self.keys[layer], self.values[layer] = k[:, :, start:], v[:, :, start:]
        return k, v

    def advance(self, num_new: int) -> None:
        """Called once per forward, after every layer has stored its `num_new` slots."""
        self.seen += num_new
        self.length += num_new
        if self.keep is not None:
            self.length = min(self.length, self.keep)
