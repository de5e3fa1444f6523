"""Weight maps between H64LM and the stock transformers classes of `stock.py`, both directions.

Ours fuses W_qkv and [W_gate; W_up] and stores experts as x @ W ([E, d, 2I], [E, I, d]); the stock
classes split them and store experts as x @ W^T ([E, 2I, d], [E, d, I]). Two maps are not plain
renames:
- Ernie 4.5 rotates channel pairs (2i, 2i+1) where we rotate (i, i + D/2): its W_q and W_k rows
  are ours permuted per head (`_interleave`), which leaves every q.k product unchanged;
- Qwen2-MoE gates its shared expert by sigmoid(w . x): with w = 0 the gate is exactly 1/2, so
  the exported W_down is ours times 2 (exact in floating point), and an import halves it.
"""

from typing import Dict

import torch

from h64lm.model import H64LMConfig

__all__ = ["from_stock_state_dict", "to_stock_state_dict"]

Tensors = Dict[str, torch.Tensor]

# family -> (router bias key under mlp.gate, shared-expert module name, its gate key or None)
_MOE_NAMES = {
    "mixtral": (None, None, None),
    "qwen2_moe": (None, "shared_expert", "shared_expert_gate.weight"),
    "qwen3_moe": (None, None, None),
    "ernie4_5_moe": ("moe_statics.e_score_correction_bias", "shared_experts", None),
    "glm4_moe": ("e_score_correction_bias", "shared_experts", None),
}

_ALWAYS_SHARED = ("qwen2_moe", "glm4_moe")  # build a shared expert even when there is none


def _interleave(head_dim: int) -> torch.Tensor:
    """Channel order [0, D/2, 1, D/2 + 1, ...]: half-split RoPE pairs -> adjacent pairs."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=1).flatten()


def _permute_heads(w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """w [H * D, d] -> its rows reordered by `order` within each head."""
    D = order.numel()
    return w.view(-1, D, w.shape[-1])[:, order].reshape(w.shape)


def _rope_order(c: H64LMConfig, family: str, inverse: bool):
    if family != "ernie4_5_moe":
        return None
    order = _interleave(c.head_dim)
    return torch.argsort(order) if inverse else order


def _swiglu_to(ours: Tensors, src: str, dst: str, scale_down: float = 1.0) -> Tensors:
    gate, up = ours[src + "gate_up_proj.weight"].chunk(2)
    return {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up,
            dst + "down_proj.weight": ours[src + "down_proj.weight"] * scale_down}


def _swiglu_from(hf: Tensors, src: str, dst: str, scale_down: float = 1.0) -> Tensors:
    return {dst + "gate_up_proj.weight": torch.cat((hf[src + "gate_proj.weight"], hf[src + "up_proj.weight"])),
            dst + "down_proj.weight": hf[src + "down_proj.weight"] * scale_down}


def to_stock_state_dict(ours: Tensors, c: H64LMConfig, family: str) -> Tensors:
    """Our state dict -> the stock model's (`family`: a key of stock.STOCK_ARCHITECTURES)."""
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    order = _rope_order(c, family, inverse=False)
    sparse = set(c.moe_layer_indices())
    out = {"model.embed_tokens.weight": ours["embed_tokens.weight"],
           "model.norm.weight": ours["norm.weight"], "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "ffn_norm.weight"]
        q, k, v = ours[src + "attn.qkv_proj.weight"].split((q_dim, kv_dim, kv_dim))
        if order is not None:
            q, k = _permute_heads(q, order), _permute_heads(k, order)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[f"{dst}self_attn.{name}.weight"] = w
        out[dst + "self_attn.o_proj.weight"] = ours[src + "attn.o_proj.weight"]
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{dst}self_attn.{name}.weight"] = ours[f"{src}attn.{name}.weight"]
        if i not in sparse:
            out.update(_swiglu_to(ours, src + "ffn.", dst + "mlp."))
            continue
        bias_key, shared, shared_gate = _MOE_NAMES[family]
        out[dst + "mlp.gate.weight"] = ours[src + "ffn.router.weight"]
        for name in ("gate_up_proj", "down_proj"):
            out[f"{dst}mlp.experts.{name}"] = ours[f"{src}ffn.experts.{name}"].transpose(1, 2)
        if bias_key is not None:
            bias = ours.get(src + "ffn.router.bias", torch.zeros(c.num_experts))
            out[f"{dst}mlp.gate.{bias_key}"] = bias.float().view_as(_bias_like(family, c))
        if shared is None:
            continue
        if shared_gate is not None:  # sigmoid(0) = 1/2 exactly: double W_down
            out[f"{dst}mlp.{shared_gate}"] = torch.zeros(1, c.hidden_size, dtype=out[dst + "mlp.gate.weight"].dtype)
        if c.num_shared_experts:
            out.update(_swiglu_to(ours, src + "ffn.shared.", f"{dst}mlp.{shared}.",
                                  2.0 if shared_gate is not None else 1.0))
        elif family in _ALWAYS_SHARED:  # a zero-width SwiGLU adds exactly 0
            dtype = out[dst + "mlp.gate.weight"].dtype
            for name, shape in (("gate_proj", (0, c.hidden_size)), ("up_proj", (0, c.hidden_size)),
                                ("down_proj", (c.hidden_size, 0))):
                out[f"{dst}mlp.{shared}.{name}.weight"] = torch.zeros(shape, dtype=dtype)
    return out


def _bias_like(family: str, c: H64LMConfig) -> torch.Tensor:
    return torch.empty(1, c.num_experts) if family == "ernie4_5_moe" else torch.empty(c.num_experts)


def from_stock_state_dict(hf: Tensors, c: H64LMConfig, family: str) -> Tensors:
    """The inverse of `to_stock_state_dict`. A ValueError names a tensor H64LM cannot hold (a
    non-zero Qwen2-MoE shared-expert gate)."""
    order = _rope_order(c, family, inverse=True)
    sparse = set(c.moe_layer_indices())
    out = {"embed_tokens.weight": hf["model.embed_tokens.weight"],
           "norm.weight": hf["model.norm.weight"],
           "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        q, k, v = (hf[f"{src}self_attn.{n}_proj.weight"] for n in "qkv")
        if order is not None:
            q, k = _permute_heads(q, order), _permute_heads(k, order)
        out[dst + "attn.qkv_proj.weight"] = torch.cat((q, k, v))
        out[dst + "attn.o_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{dst}attn.{name}.weight"] = hf[f"{src}self_attn.{name}.weight"]
        if i not in sparse:
            out.update(_swiglu_from(hf, src + "mlp.", dst + "ffn."))
            continue
        bias_key, shared, shared_gate = _MOE_NAMES[family]
        out[dst + "ffn.router.weight"] = hf[src + "mlp.gate.weight"]
        for name in ("gate_up_proj", "down_proj"):
            out[f"{dst}ffn.experts.{name}"] = hf[f"{src}mlp.experts.{name}"].transpose(1, 2)
        if bias_key is not None and hf[f"{src}mlp.gate.{bias_key}"].any():
            out[dst + "ffn.router.bias"] = hf[f"{src}mlp.gate.{bias_key}"].float().flatten()
        if shared is None or not c.num_shared_experts:
            continue
        if shared_gate is not None and hf[f"{src}mlp.{shared_gate}"].any():
            raise ValueError(f"layer {i}'s {shared_gate} is not zero: a gated shared expert, which "
                             "H64LM's ungated shared experts cannot express")
        out.update(_swiglu_from(hf, f"{src}mlp.{shared}.", dst + "ffn.shared.",
                                0.5 if shared_gate is not None else 1.0))
    return {k: v.contiguous() for k, v in out.items()}

