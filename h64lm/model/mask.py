"""The additive attention bias for the cases the fused causal kernel cannot express.

Causal order, the sliding window, key padding and ALiBi combine into one float tensor in the
compute dtype. Masked entries get `finfo(dtype).min` (finite, so fp16/bf16 never see -1e9 turn
into -inf) and every query may always see its own slot: a left-padding query row, whose keys are
all padding, then attends to itself instead of producing a NaN from an all-masked softmax.
"""

from typing import Optional

import torch

from .alibi import alibi_bias

__all__ = ["attention_bias"]


def attention_bias(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    sliding_window: Optional[int],
    slopes: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """q_slots [T], k_slots [L] (absolute sequence slots), key_padding [B, L] bool (True = real
    token) or None, slopes [H] or None -> bias [B or 1, H or 1, T, L] in `dtype`.

    A query at slot i sees keys j with j <= i and, with a window W, i - j < W (W keys in all).
    """
    offset = q_slots[:, None] - k_slots[None, :]  # [T, L]
    allowed = offset >= 0
    if sliding_window is not None:
        allowed = allowed & (offset < sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, L]
    if key_padding is not None:
        own_slot = offset == 0
        allowed = allowed & (key_padding[:, None, None, :] | own_slot)  # [B, 1, T, L]
    if slopes is not None:
        bias = alibi_bias(slopes, q_slots, k_slots).to(dtype)[None]  # [1, H, T, L]
    else:
        bias = torch.zeros((1, 1) + offset.shape, dtype=dtype, device=offset.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)
