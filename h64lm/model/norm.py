"""RMSNorm (Zhang & Sennrich, 2019), computed in fp32 so bf16/fp16 activations keep their scale.

y = x_hat * w with x_hat = x * r, r = 1 / sqrt(mean(x^2) + eps). The backward is written out
(one autograd node instead of the ~25 small ones autograd would record for the same formula, which
dominate a small model's step on a CPU):
    dL/dx = r * (g_w - x_hat * mean(g_w * x_hat))  with g_w = dL/dy * w
    dL/dw = sum over tokens of dL/dy * x_hat
"""

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 input


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # x [..., d], weight [d]
        x32 = x.to(_compute_dtype(x))
        r = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
        x_hat = x32 * r
        ctx.save_for_backward(x_hat, weight, r)
        ctx.x_dtype = x.dtype
        # rounded to x's dtype before the weight, as the reference implementations do
        return x_hat.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, r = ctx.saved_tensors
        g = grad_out.to(x_hat.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_w = g * weight.to(x_hat.dtype)
            dot = (g_w * x_hat).mean(-1, keepdim=True)  # [..., 1]
            grad_x = torch.addcmul(g_w, x_hat, dot, value=-1).mul_(r).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            d = x_hat.shape[-1]
            grad_w = (g * x_hat).reshape(-1, d).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d], weight [d] -> [..., d] in promote(x, weight) dtype."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
