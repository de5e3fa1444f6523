"""Autoregressive generation with a KV cache for batches of left-padded prompts.

For RL, G completions per prompt: the prompts are prefilled ONCE, then the cache and the last
logits are repeated G times (rows b*G .. b*G + G - 1 continue prompt b), so the prefill costs
B prompts rather than B * G. Without a sliding window the cache is a buffer preallocated for the
whole generation (`_PreallocatedCache`): each step writes one slot in place instead of
concatenating every layer's keys and values (quadratic copying in the generated length). Tokens,
attention mask and repetition-penalty mask are preallocated too; the loop stops as soon as every
row has produced EOS.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .cache import KVCache
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


class _PreallocatedCache(KVCache):
    """The prefill's cache, each row repeated `repeats` times, in buffers [B * G, H_kv, capacity,
    D]: `update` writes the new slots in place and returns views of the filled part. Only for
    models without a sliding window (a windowed cache drops old slots; it keeps `KVCache`)."""

    def __init__(self, prefill: KVCache, repeats: int, capacity: int):
        super().__init__(len(prefill.keys))
        self.seen, self.length = prefill.seen, prefill.length
        for layer, (k, v) in enumerate(zip(prefill.keys, prefill.values)):
            B, H, L, D = k.shape
            self.keys[layer] = k.new_empty(B * repeats, H, capacity, D)
            self.values[layer] = v.new_empty(B * repeats, H, capacity, D)
            self.keys[layer][:, :, :L] = k.repeat_interleave(repeats, dim=0)
            self.values[layer][:, :, :L] = v.repeat_interleave(repeats, dim=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _repeat_cache(cache: KVCache, repeats: int, capacity: int) -> KVCache:
    """The prefill cache ready for decoding B * repeats rows."""
    if cache.keep is None:
        return _PreallocatedCache(cache, repeats, capacity)
    if repeats > 1:
        cache.keys = [k.repeat_interleave(repeats, dim=0) for k in cache.keys]
        cache.values = [v.repeat_interleave(repeats, dim=0) for v in cache.values]
    return cache


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
    num_return_sequences: int = 1,
) -> torch.Tensor:
    """input_ids [B, T] (left-padded where attention_mask is 0) -> [B * G, T + n],
    G = num_return_sequences, n <= max_new_tokens; rows b*G .. b*G + G - 1 continue prompt b.

    Fewer than max_new_tokens only when every row has produced `eos_token_id`; after its EOS a row
    is filled with `pad_token_id`. temperature=0 is greedy; `generator` makes sampling repeatable.
    The sampling arguments are validated where they are configured (`GenConfig`).
    """
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be >= 1")
    check_positions(model.config, input_ids.shape[1] + max_new_tokens, "the prompt + gen.max_new_tokens")
    was_training = model.training
    model.eval()
    G, T = num_return_sequences, input_ids.shape[1]
    width = T + max_new_tokens
    padded = attention_mask is not None and not bool(attention_mask.all())
    prompt_mask = attention_mask.long() if padded else None
    out = model(input_ids, attention_mask=prompt_mask, use_cache=True, router_stats=False)
    cache = _repeat_cache(out.past_key_values, G, width)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)  # [B * G, V]
    del out

    rows = input_ids.shape[0] * G
    tokens = input_ids.new_full((rows, width), pad_token_id)  # [B * G, T + max_new_tokens]
    tokens[:, :T] = input_ids.repeat_interleave(G, dim=0)
    mask = None
    if padded:  # every generated slot is a real token: ones after the prompt's mask
        mask = torch.ones_like(tokens)
        mask[:, :T] = prompt_mask.repeat_interleave(G, dim=0)
    seen = None  # which slots count for the repetition penalty: real prompt tokens, no post-EOS pads
    if repetition_penalty != 1.0:
        seen = torch.ones((rows, width), dtype=torch.bool, device=tokens.device)
        if attention_mask is not None:
            seen[:, :T] = attention_mask.bool().repeat_interleave(G, dim=0)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    end = T
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, tokens[:, :end], seen[:, :end],
                                              repetition_penalty)
        sampled = select_next(logits, temperature, top_k, top_p, generator)  # [B * G]
        tokens[:, end] = sampled.masked_fill(finished, pad_token_id)
        if seen is not None:
            seen[:, end] = ~finished
        end += 1
        if eos_token_id is not None:
            finished |= sampled == eos_token_id
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            # finished rows are fed their sampled token: pad_token_id need not be a valid id
            out = model(sampled[:, None], attention_mask=None if mask is None else mask[:, :end],
                        past_key_values=cache, use_cache=True, router_stats=False)
            logits = out.logits[:, -1].float()
    model.train(was_training)
    return tokens[:, :end]
