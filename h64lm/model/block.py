"""Pre-norm transformer block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(x)), FFN dense or MoE."""

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .attention import Attention
from .cache import KVCache
from .config import H64LMConfig
from .mlp import SwiGLU
from .moe import MoELayer
from .norm import RMSNorm

__all__ = ["Block"]


class Block(nn.Module):
    def __init__(self, config: H64LMConfig, layer_idx: int, sparse: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = (MoELayer(config) if sparse
                    else SwiGLU(config.hidden_size, config.intermediate_size))
        self.sparse = sparse
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: Optional[Tuple[torch.Tensor, torch.Tensor]],
        bias: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[KVCache],
        router_stats: bool = True,
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        """x [B, T, hidden] -> (x [B, T, hidden], MoE stats; None for a dense block or without
        `router_stats`)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), rotary, bias, is_causal, cache))
        stats = None
        if self.sparse:
            y, stats = self.ffn(self.ffn_norm(x), router_stats)
        else:
            y = self.ffn(self.ffn_norm(x))
        return x + self.dropout(y), stats
