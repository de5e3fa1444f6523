"""Log-probabilities of label tokens under a model's logits, per token and per sequence.

Preference and policy objectives need log pi(y_t | x, y_<t) of the tokens actually present, not a
loss. log p = z_label - logsumexp(z): computed over chunks of rows, so at most one [chunk, V] fp32
block exists beyond the logits themselves (a full log_softmax would add a second [B, T, V] tensor,
and its fp32 copy when the logits are bf16). Labels are aligned with positions (labels[b, t] is the
target of position t); IGNORE_INDEX positions get log-probability 0 and count for nothing.

`hidden_token_logprobs` goes further for policy/DPO training at large vocabularies: it starts from
the final hidden states and the LM head, so the [B, T, V] logits never exist. Each chunk's logits
are computed, reduced to the label log-probs and dropped; backward recomputes them chunk by chunk
(one extra head GEMM) and applies d log p_y / d z = onehot(y) - softmax(z).
"""

from __future__ import annotations

import torch

from h64lm.model.loss import IGNORE_INDEX

__all__ = ["hidden_token_logprobs", "token_logprobs", "sequence_logprobs", "REDUCTIONS"]

REDUCTIONS = ("sum", "mean")
CHUNK_ROWS = 1024  # [1024, 32000] fp32 = 128 MiB at the Mistral vocabulary
HEAD_CHUNK = 256  # rows per head GEMM in `hidden_token_logprobs` (as the chunked cross-entropy)


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


def _head_logits(h: torch.Tensor, weight: torch.Tensor, cap: float | None):
    """h [c, d] -> (fp32 logits [c, V], tanh of the capped logits or None for the gradient)."""
    z = (h @ weight.T).float()
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, t


class _HeadLabelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, cap):
        # hidden [N, d], weight [V, d], labels [N] -> log p(label) [N] fp32
        index = labels.clamp(min=0)[:, None]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            z, _ = _head_logits(hidden[start:start + chunk], weight, cap)  # [c, V]
            out[start:start + chunk] = (z.gather(1, index[start:start + chunk]).squeeze(1)
                                        - z.logsumexp(-1))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.cap = chunk, cap
        return out.masked_fill(labels == IGNORE_INDEX, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_all = grad_out.float() * (labels != IGNORE_INDEX)  # [N]; ignored rows pass nothing back
        index = labels.clamp(min=0)[:, None]
        for start in range(0, hidden.shape[0], ctx.chunk):
            h_c = hidden[start:start + ctx.chunk]  # [c, d]
            g = g_all[start:start + ctx.chunk, None]  # [c, 1]
            z, t = _head_logits(h_c, weight, ctx.cap)
            d = torch.softmax(z, dim=-1).mul_(-g)  # [c, V]: g (onehot - p)
            d.scatter_add_(1, index[start:start + ctx.chunk], g)
            if t is not None:
                d.mul_(1 - t.square())  # through the cap
            if need_h:
                grad_h[start:start + ctx.chunk] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += d.T @ h_c.float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def hidden_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          logit_softcap: float | None = None,
                          chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """hidden [B, T, d] (after the final norm), LM head weight [V, d], labels [B, T] ->
    log p(label) [B, T] fp32, 0 where ignored; equal to `token_logprobs` of
    softcap(hidden @ weight.T) without materialising those logits (also in backward)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "disagree: expected hidden [B, T, d] and labels [B, T]")
    flat = _HeadLabelLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                    labels.reshape(-1), chunk, logit_softcap)
    return flat.view(labels.shape)
