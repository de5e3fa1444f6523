"""H64LM as a transformers model, for `trust_remote_code=True` (copied next to the weights).

Standalone on purpose: a folder on the hub cannot import the h64lm package, so this file restates
our network compactly (pre-norm blocks, fused W_qkv, GQA through SDPA, RoPE in the half-split
layout, ALiBi, sliding window, top-k MoE with renormalised weights, optional capacity factor and
shared experts). Parameter names are ours, prefixed with `model.` (except `lm_head`), so weights
move between the two without renaming. Tests check it against h64lm.model to 1e-4.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_h64lm import H64LMHFConfig

__all__ = ["H64LMHFForCausalLM", "H64LMHFModel", "H64LMHFPreTrainedModel"]


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # fp32 statistics, rounded back before the weight
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) \
            * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * width, bias=False)  # [W_gate; W_up]
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rotary(x, positions, theta):
    """x [B, T, H, D], positions [B|1, T] -> x rotated: channel i pairs with channel i + D/2."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # [B, T, 1, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * angles.cos().to(x.dtype) + torch.cat((-x2, x1), dim=-1) * angles.sin().to(x.dtype)


def alibi_slopes(n):
    """Press et al.: 2^(-8/n)^h for n a power of two; other n take every other 2n' slope."""
    def geometric(m):
        return [(2.0 ** (-8.0 / m)) ** (h + 1) for h in range(m)]
    base = 2 ** math.floor(math.log2(n))
    slopes = geometric(base) + geometric(2 * base)[0::2][: n - base]
    return torch.tensor(slopes, dtype=torch.float32)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.H_kv = config.num_attention_heads, config.num_key_value_heads
        self.D = config.hidden_size // self.H
        self.qkv_proj = nn.Linear(config.hidden_size, (self.H + 2 * self.H_kv) * self.D, bias=False)
        self.o_proj = nn.Linear(self.H * self.D, config.hidden_size, bias=False)
        self.qk_norm = getattr(config, "qk_norm", False)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.D, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.D, config.rms_norm_eps)

    def forward(self, x, positions, bias, cache, theta):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.H + 2 * self.H_kv, self.D)
        q, k, v = qkv.split((self.H, self.H_kv, self.H_kv), dim=2)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is not None:
            q, k = rotary(q, positions, theta), rotary(k, positions, theta)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H_kv, past + T, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             enable_gqa=self.H != self.H_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, width, E = config.hidden_size, config.moe_intermediate_size, config.num_local_experts
        self.k, self.E, self.norm = config.num_experts_per_tok, E, config.norm_topk_prob
        self.capacity = (config.capacity_factor, config.eval_capacity_factor)  # (training, eval)
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.empty(E, d))
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(E, d, 2 * width))  # x @ W
        self.experts.down_proj = nn.Parameter(torch.empty(E, width, d))
        shared = config.num_shared_experts
        self.shared = SwiGLU(d, shared * width) if shared else None  # S experts = one S*I wide

    def forward(self, x):  # [B, T, d]
        tokens = x.reshape(-1, x.shape[-1])  # [N, d]
        probs = F.linear(tokens.float(), self.router.weight.float()).softmax(-1)  # fp32 [N, E]
        top_p, experts = probs.topk(self.k, dim=-1)  # [N, k]
        weights = (top_p / top_p.sum(-1, keepdim=True) if self.norm else top_p).to(x.dtype)
        keep = torch.ones_like(experts, dtype=torch.bool)
        factor = self.capacity[0] if self.training else self.capacity[1]
        if factor is not None:  # each expert keeps its C earliest assignments
            capacity = math.ceil(factor * experts.numel() / self.E)
            one_hot = F.one_hot(experts.reshape(-1), self.E)  # [N*k, E], in token order
            rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
            keep = (rank < capacity).view_as(experts)
        y = torch.zeros_like(tokens)
        for e in range(self.E):
            token, slot = torch.where((experts == e) & keep)
            if token.numel():
                gate, up = (tokens[token] @ self.experts.gate_up_proj[e]).chunk(2, dim=-1)
                out = (F.silu(gate) * up) @ self.experts.down_proj[e]
                y.index_add_(0, token, out * weights[token, slot, None])
        if self.shared is not None:
            y = y + self.shared(tokens)
        return y.view_as(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = (MoE(config) if layer_idx in config.moe_layer_ids
                    else SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, x, positions, bias, cache, theta):
        x = x + self.attn(self.attn_norm(x), positions, bias, cache, theta)
        return x + self.ffn(self.ffn_norm(x))


class H64LMHFPreTrainedModel(PreTrainedModel):
    config_class = H64LMHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=std)


class H64LMHFModel(H64LMHFPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _bias(self, past, end, key_padding, dtype, device):
        """Additive [B|1, H|1, T, L] bias: causal, window (i - j < W), left padding (a query
        always sees itself, so no row is empty), ALiBi -m_h * (i - j)."""
        offset = (torch.arange(past, end, device=device)[:, None]
                  - torch.arange(end, device=device)[None])  # [T, L], i - j
        allowed = offset >= 0
        if self.config.attention_window is not None:
            allowed = allowed & (offset < self.config.attention_window)
        allowed = allowed[None, None]
        if key_padding is not None:
            allowed = allowed & (key_padding[:, None, None, :] | (offset == 0))
        if "alibi" in self.config.position_encoding:
            slopes = alibi_slopes(self.config.num_attention_heads).to(device)
            bias = (-slopes[:, None, None] * offset.clamp(min=0).float()).to(dtype)[None]
        else:
            bias = torch.zeros((1, 1) + offset.shape, dtype=dtype, device=device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False):
        T = input_ids.shape[1]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        h = self.embed_tokens(input_ids)  # [B, T, d]
        key_padding = None
        if attention_mask is not None:  # [B, past + T], 1 = token, 0 = left padding
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            key_padding = attention_mask.bool()
        else:
            positions = torch.arange(past, past + T, device=h.device)[None]
        bias = self._bias(past, past + T, key_padding, h.dtype, h.device)
        if "rope" not in self.config.position_encoding:
            positions = None
        for layer in self.layers:
            h = layer(h, positions, bias, cache, self.config.rope_theta)
        return self.norm(h), cache


class H64LMHFForCausalLM(H64LMHFPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = H64LMHFModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None,
                labels=None, past_key_values=None, **kwargs):
        """input_ids [B, T] -> logits [B, T, V]; labels are the inputs (shifted here, HF style)."""
        h, cache = self.model(input_ids, attention_mask, cache or past_key_values,
                              bool(use_cache))
        logits = self.lm_head(h)
        cap = getattr(self.config, "logit_softcap", None)
        if cap is not None:  # Gemma 2 soft-capping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
