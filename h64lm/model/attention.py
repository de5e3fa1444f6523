"""Grouped-query self-attention through `F.scaled_dot_product_attention`.

K/V keep `num_kv_heads` heads all the way into the kernel (`enable_gqa=True`, torch >= 2.5), so
neither the cache nor the kernel inputs repeat them.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import H64LMConfig
from .norm import RMSNorm
from .rope import apply_rotary

__all__ = ["Attention"]


class Attention(nn.Module):
    def __init__(self, config: H64LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # One fused projection for W_q, W_k, W_v: one GEMM instead of three.
        self.qkv_proj = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # per head, over head_dim
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rotary: Optional[Tuple[torch.Tensor, torch.Tensor]],
        bias: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[KVCache],
    ) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]. `bias` is additive [B|1, H|1, T, L] or None."""
        B, T, _ = x.shape
        H, H_kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, self.head_dim)
        qk, v = qkv.split((H + H_kv, H_kv), dim=2)  # [B, T, H + H_kv, D], [B, T, H_kv, D]
        if self.q_norm is not None:
            q, k = qk.split((H, H_kv), dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)  # queries and keys in one pass
        q, k = qk.split((H, H_kv), dim=2)
        # [B, T, heads, D] -> [B, heads, T, D]: strided views, SDPA reads them in place
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, H_kv, L, D]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
