"""Moving rows between token order and expert order when no assignment is dropped.

Dropless, the N*k assignments sorted by expert are a permutation of all of them, so both moves
are gathers and so are their gradients: the backward of a gather by `perm` is a gather by its
inverse. Autograd's generic backward for `index_select` is a scatter-add instead (atomic on GPUs,
serial per row on CPUs), which measured as the slowest part of the MoE layer's backward.
"""

import torch

__all__ = ["gather_tokens", "permute_rows"]


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, token_index, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return tokens.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        hidden = grad_out.shape[-1]
        # assignment a = n * k + j belongs to token n; its row in expert order is inverse[a]
        grad = grad_out.index_select(0, inverse).view(-1, ctx.top_k, hidden).sum(dim=1)
        return grad, None, None, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse), None, None


def gather_tokens(tokens: torch.Tensor, token_index: torch.Tensor, inverse: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """tokens [N, d]; token_index [N*k] (the source token of each assignment in expert order,
    `Dispatch.token`), inverse [N*k] (the inverse of the expert-order permutation) -> [N*k, d],
    row m = tokens[token_index[m]]."""
    return _GatherTokens.apply(tokens, token_index, inverse, top_k)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x [M, d] -> x[perm], for a permutation `perm` whose inverse is `inverse`."""
    return _PermuteRows.apply(x, perm, inverse)
