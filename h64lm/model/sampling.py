"""Next-token selection from last-position logits: repetition penalty, temperature, top-k, top-p."""

from typing import Optional

import torch

__all__ = ["apply_repetition_penalty", "filter_top_k", "filter_top_p", "select_next"]


def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019), per row: a token already in that row's sequence has
    its logit divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 always makes it less likely. logits [B, V]; tokens [B, S]; seen [B, S] bool
    marks the positions that count (not padding)."""
    if penalty == 1.0:
        return logits
    present = torch.zeros_like(logits).scatter_add_(1, tokens, seen.to(logits.dtype)) > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row. logits [B, V]."""
    k = min(k, logits.shape[-1])
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probability reaches p (the top token always stays). logits [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # mass before this token
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] fp32 -> next token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
