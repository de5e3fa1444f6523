"""Autoregressive generation with a KV cache for batches of left-padded prompts."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .config import check_positions
from .sampling import apply_repetition_penalty, select_next

__all__ = ["generate", "left_pad"]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 0,
             device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of different lengths -> (input_ids [B, T_max], attention_mask [B, T_max]),
    padding on the left so every prompt ends at the last column, where generation continues."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one prompt and every prompt needs >= 1 token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """input_ids [B, T] (left-padded where attention_mask is 0) -> [B, T + n], n <= max_new_tokens.

    Fewer than max_new_tokens only when every row has produced `eos_token_id`; after its EOS a row
    is filled with `pad_token_id`. temperature=0 is greedy; `generator` makes sampling repeatable.
    The sampling arguments are validated where they are configured (`GenConfig`).
    """
    check_positions(model.config, input_ids.shape[1] + max_new_tokens, "the prompt + gen.max_new_tokens")
    was_training = model.training
    model.eval()
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask.long() if padded else None
    seen = (attention_mask.bool() if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool))
    tokens = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = model(input_ids, attention_mask=mask, use_cache=True, router_stats=False)
    for step in range(max_new_tokens):
        logits = apply_repetition_penalty(out.logits[:, -1].float(), tokens, seen,
                                          repetition_penalty)
        sampled = select_next(logits, temperature, top_k, top_p, generator)  # [B]
        next_token = sampled.masked_fill(finished, pad_token_id)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        seen = torch.cat((seen, ~finished[:, None]), dim=1)
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            # finished rows are fed their sampled token: pad_token_id need not be a valid id
            out = model(sampled[:, None], attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True, router_stats=False)
    model.train(was_training)
    return tokens
