"""The additive attention bias for the cases the fused causal kernel cannot express.

Causal order, the sliding window, key padding, packed-document boundaries and ALiBi combine into
one float tensor in the compute dtype. Masked entries get `finfo(dtype).min` (finite, so fp16/bf16
never see -1e9 turn into -inf) and every query may always see its own slot: a left-padding query
row, whose keys are all padding, then attends to itself instead of producing a NaN from an
all-masked softmax.
"""

from typing import Optional

import torch

from .alibi import alibi_bias

__all__ = ["attention_bias", "document_positions"]


def attention_bias(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    sliding_window: Optional[int],
    slopes: Optional[torch.Tensor],
    dtype: torch.dtype,
    document_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q_slots [T], k_slots [L] (absolute sequence slots), key_padding [B, L] bool (True = real
    token) or None, slopes [H] or None, document_ids [B, T] (packed rows, no cache: L = T) or None
    -> bias [B or 1, H or 1, T, L] in `dtype`.

    A query at slot i sees keys j with j <= i and, with a window W, i - j < W (W keys in all);
    with document_ids, only keys of its own document (block-diagonal causal attention). Inside one
    document slot distance equals position distance, so ALiBi's penalty needs no change.
    """
    offset = q_slots[:, None] - k_slots[None, :]  # [T, L]
    allowed = offset >= 0
    if sliding_window is not None:
        allowed = allowed & (offset < sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, L]
    if key_padding is not None:
        own_slot = offset == 0
        allowed = allowed & (key_padding[:, None, None, :] | own_slot)  # [B, 1, T, L]
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
        allowed = allowed & same[:, None]  # [B, 1, T, T]
    if slopes is not None:
        bias = alibi_bias(slopes, q_slots, k_slots).to(dtype)[None]  # [1, H, T, L]
    else:
        bias = torch.zeros((1, 1) + offset.shape, dtype=dtype, device=offset.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids [B, T] -> positions [B, T] that restart at 0 where the id changes, so RoPE
    sees each packed document exactly as if it were alone in its row."""
    T = document_ids.shape[1]
    slots = torch.arange(T, device=document_ids.device).expand_as(document_ids)  # [B, T]
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # slot of the latest document start at or before each slot
    first = torch.where(starts, slots, torch.zeros_like(slots)).cummax(dim=1).values
    return slots - first
