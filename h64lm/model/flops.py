"""Parameter counts and training FLOPs per token, from the config alone (used for MFU)."""

from typing import Union

from torch import nn

from .config import H64LMConfig

__all__ = ["count_parameters", "active_parameters_per_token", "flops_per_token"]


def _attention_params(c: H64LMConfig) -> int:
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return c.hidden_size * (q_dim + 2 * kv_dim) + q_dim * c.hidden_size  # W_qkv, W_o


def _swiglu_params(hidden: int, width: int) -> int:
    return 3 * hidden * width  # W_gate, W_up, W_down


def _num_sparse(c: H64LMConfig) -> int:
    return len(c.moe_layer_indices())


def count_parameters(model_or_config: Union[nn.Module, H64LMConfig]) -> int:
    """Total trainable parameters; a tied embedding/head matrix counts once."""
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())
    c = model_or_config
    width = c.expert_intermediate_size
    sparse = _num_sparse(c)
    moe_ffn = (c.num_experts * _swiglu_params(c.hidden_size, width)
               + c.num_experts * c.hidden_size  # router
               + c.num_shared_experts * _swiglu_params(c.hidden_size, width))
    per_layer = _attention_params(c) + 2 * c.hidden_size  # + two RMSNorm weights
    total = (c.num_layers * per_layer
             + (c.num_layers - sparse) * _swiglu_params(c.hidden_size, c.intermediate_size)
             + sparse * moe_ffn
             + c.hidden_size  # final norm
             + c.vocab_size * c.hidden_size)  # embedding
    if not c.tie_word_embeddings:
        total += c.vocab_size * c.hidden_size
    return total


def active_parameters_per_token(config: H64LMConfig) -> int:
    """Parameters one token touches: the total minus the E - k routed experts it skips in each MoE
    layer (embedding and head included)."""
    skipped = config.num_experts - config.num_experts_per_token
    return (count_parameters(config)
            - _num_sparse(config) * skipped
            * _swiglu_params(config.hidden_size, config.expert_intermediate_size))


def mean_keys_per_query(seq_len: int, sliding_window=None) -> float:
    """Average over causal positions t = 1..T of the keys query t sees, min(t, W)."""
    w = seq_len if sliding_window is None else min(sliding_window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(config: H64LMConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x the forward), active experts only:

        6 * N_mm + 12 * L * n_heads * d_head * K_mean

    N_mm counts the matrix weights a token multiplies by: per layer W_qkv and W_o; dense layers
    the SwiGLU (3 * d * d_ff); MoE layers the router (d * E) and the k routed plus the shared
    experts (3 * d * d_expert each); and the LM head (V * d). The embedding is a lookup (no FLOPs)
    and norms/activations are ignored. The second term is QK^T and AV (2 * n_heads * d_head
    multiply-adds per key each, 2 FLOPs per multiply-add, x3 for training) with K_mean the keys
    per query averaged over the causal positions, capped by the sliding window.
    """
    c = config
    width = c.expert_intermediate_size
    sparse = _num_sparse(c)
    active_experts = c.num_experts_per_token + c.num_shared_experts
    matmul_params = (c.num_layers * _attention_params(c)
                     + (c.num_layers - sparse) * _swiglu_params(c.hidden_size, c.intermediate_size)
                     + sparse * (c.hidden_size * c.num_experts
                                 + active_experts * _swiglu_params(c.hidden_size, width))
                     + c.vocab_size * c.hidden_size)
    keys = mean_keys_per_query(seq_len, c.sliding_window)
    attention = 12 * c.num_layers * c.num_attention_heads * c.head_dim * keys
    return 6 * matmul_params + attention
