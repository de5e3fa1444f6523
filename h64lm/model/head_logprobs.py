"""Label log-probabilities straight from the final hidden states and the LM head.

Policy and preference objectives need log pi(y_t | x, y_<t) of the tokens present, not a loss.
`hidden_token_logprobs` starts from the hidden states after the final norm, so the [B, T, V]
logits never exist: each chunk's logits are computed, reduced to the label log-probs and dropped;
backward recomputes them chunk by chunk (one extra head GEMM) and applies
d log p_y / d z = onehot(y) - softmax(z). The model calls it inside `forward` (under FSDP2 the
head weight is gathered only there).
"""

import torch

from .loss import IGNORE_INDEX

__all__ = ["hidden_token_logprobs", "HEAD_CHUNK"]

HEAD_CHUNK = 256  # rows per head GEMM (as the chunked cross-entropy)


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
