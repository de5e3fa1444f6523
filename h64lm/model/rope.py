"""Rotary position embeddings (Su et al., 2021) in the half-split layout used by Llama/Mixtral.

Channel i of the first half is rotated with channel i of the second half by angle
`position * theta^(-2i/d)`:  y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1].
With the sign folded into the table (sin_signed = [-sin, sin]) the rotation is a swap of the two
halves: y = x * cos + swap(x) * sin_signed, and since swap is its own transpose the gradient is
dL/dx = g * cos + swap(g * sin_signed). One autograd node does both, for queries and keys at once.
The table grows on demand, so ALiBi models that read past `max_position_embeddings` still get
rotary phases for every position.
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
        sin = angles.sin()
        self.cos_table = torch.cat((angles, angles), dim=-1).cos()  # [P, D]
        self.sin_table = torch.cat((-sin, sin), dim=-1)  # [P, D], sign of rotate_half folded in

    def forward(self, positions: torch.Tensor, bound: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int, all < bound) -> cos, sin_signed [B, T, 1, D] fp32, broadcast
        over the heads of x [B, T, H, D].

        `bound` is known on the host (cache length + T): sizing the table needs no device sync.
        """
        if bound > self.cos_table.shape[0]:
            self._extend(max(bound, 2 * self.cos_table.shape[0]))
        return self.cos_table[positions].unsqueeze(2), self.sin_table[positions].unsqueeze(2)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    return x.roll(x.shape[-1] // 2, dims=-1)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, _swap_halves(x), sin)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _swap_halves(grad_out * sin).addcmul_(grad_out, cos), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin_signed [B, T, 1, D] fp32 (cast to x's dtype, as the reference
    does) -> [B, T, H, D]."""
    return _Rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))
