"""Log-probabilities of label tokens under a model's logits, per token and per sequence.

Preference and policy objectives need log pi(y_t | x, y_<t) of the tokens actually present, not a
loss. log p = z_label - logsumexp(z): computed over chunks of rows, so at most one [chunk, V] fp32
block exists beyond the logits themselves (a full log_softmax would add a second [B, T, V] tensor,
and its fp32 copy when the logits are bf16). Labels are aligned with positions (labels[b, t] is the
target of position t); IGNORE_INDEX positions get log-probability 0 and count for nothing.

Inside training the model computes them itself (`forward(..., token_logprobs=True)`, from the
hidden states: `h64lm/model/head_logprobs.py`), so the logits never exist there.
"""

from __future__ import annotations

import torch

from h64lm.model.loss import IGNORE_INDEX

__all__ = ["token_logprobs", "sequence_logprobs", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean")
CHUNK_ROWS = 1024  # [1024, 32000] fp32 = 128 MiB at the Mistral vocabulary


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                   chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """logits [B, T, V] (any float dtype), labels [B, T] -> log p(label) [B, T] fp32, 0 where the
    label is IGNORE_INDEX. Differentiable w.r.t. the logits."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "disagree: expected logits [B, T, V] and labels [B, T]")
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    target = labels.reshape(-1)  # [N]
    valid = target != IGNORE_INDEX
    index = target.clamp(min=0)[:, None]  # [N, 1]; ignored rows read token 0, zeroed below
    parts = []
    for start in range(0, flat.shape[0], chunk_rows):
        z = flat[start:start + chunk_rows].float()  # [c, V]
        parts.append(z.gather(1, index[start:start + chunk_rows]).squeeze(1) - z.logsumexp(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.masked_fill(~valid, 0.0).view(labels.shape)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                      reduction: str = "sum") -> torch.Tensor:
    """logits [B, T, V], labels [B, T] -> [B]: the sum of each row's label log-probs (the log
    likelihood of the completion), or their mean over the row's counted tokens ("mean", the
    length-normalised form; a row with no counted token gives 0)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    per_token = token_logprobs(logits, labels)  # [B, T]
    total = per_token.sum(-1)  # [B]
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
