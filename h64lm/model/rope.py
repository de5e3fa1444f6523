"""Rotary position embeddings (Su et al., 2021) in the half-split layout used by Llama/Mixtral.

Channel i of the first half is rotated with channel i of the second half by angle
`position * theta^(-2i/d)`. The cos/sin table grows on demand, so ALiBi models that read past
`max_position_embeddings` still get rotary phases for every position.
"""

from typing import Tuple

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, initial_length: int):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self._extend(initial_length)

    def _extend(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)  # [P, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [P, D]
        self.cos_table, self.sin_table = angles.cos(), angles.sin()

    def forward(self, positions: torch.Tensor, bound: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int, all < bound) -> cos, sin [B, 1, T, D] fp32, broadcast over heads.

        `bound` is known on the host (cache length + T): sizing the table needs no device sync.
        """
        if bound > self.cos_table.shape[0]:
            self._extend(max(bound, 2 * self.cos_table.shape[0]))
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D] fp32 (cast to x's dtype, as the reference does)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
