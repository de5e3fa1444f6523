"""ALiBi (Press et al., 2022): a per-head linear penalty on query-key distance instead of positions.

Slopes form the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n a power of two. For
other head counts the paper takes the n' = 2^floor(log2 n) slopes and fills the remaining heads
with every other slope of the 2n' sequence.
"""

import math

import torch

__all__ = ["alibi_slopes", "alibi_bias"]


def _power_of_two_slopes(n: int) -> list:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's per-head slopes m_h > 0, shape [H] (fp32)."""
    base = 2 ** math.floor(math.log2(num_heads))
    slopes = _power_of_two_slopes(base)
    if base < num_heads:
        slopes += _power_of_two_slopes(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-m_h * (i - j) for keys j <= i, 0 for future keys (the causal mask removes those anyway).

    slopes [H], q_pos [T], k_pos [L] -> [H, T, L] fp32; only ever a penalty, growing with distance.
    """
    distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).to(torch.float32)
    return -slopes[:, None, None] * distance
