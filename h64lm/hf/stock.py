"""Stock transformers architectures that express an H64LM variant exactly, and the weight maps.

| our variant (position_encoding=rope)                      | stock class |
| moe_layers=all, no shared experts, no capacity factor     | Mixtral     |
| moe_layers=none, no window                                | Llama       |
| moe_layers=none, sliding window                           | Mistral     |

Their windows mean what ours means (a query at i sees keys j with i - j < W, transformers'
`sliding_window_overlay`), and Mixtral's router is ours (fp32 softmax, top-k renormalised).
Everything else goes to the custom format (`modeling_h64lm.py`). `transformers` is imported
lazily so the model package does not depend on it.
"""

from typing import Dict, Optional

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

__all__ = ["STOCK_ARCHITECTURES", "from_stock_state_dict", "stock_architecture", "stock_config",
           "to_hf_mixtral", "to_hf_stock", "to_stock_state_dict"]

STOCK_ARCHITECTURES = ("mixtral", "mistral", "llama")
Tensors = Dict[str, torch.Tensor]


def _mixtral_blockers(c: H64LMConfig) -> list:
    blockers = []
    if c.moe_layer_indices() != list(range(c.num_layers)):
        blockers.append(f"model.moe_layers={c.moe_layers!r} (Mixtral needs 'all')")
    if c.position_encoding != "rope":
        blockers.append(f"model.position_encoding={c.position_encoding!r} (needs 'rope')")
    if c.num_shared_experts:
        blockers.append(f"model.num_shared_experts={c.num_shared_experts} (needs 0)")
    if c.capacity_factor is not None:
        blockers.append(f"model.capacity_factor={c.capacity_factor} (needs null)")
    if not c.normalize_topk:
        blockers.append("model.router_norm_topk off (Mixtral renormalises the top-k weights)")
    if c.router_score != "softmax" or c.router_bias_update_rate:
        blockers.append("model.router_score / router_bias_update_rate (Mixtral: softmax, no bias)")
    return blockers


def stock_architecture(c: H64LMConfig) -> Optional[str]:
    """'mixtral', 'mistral', 'llama', or None when only the custom format is exact."""
    if c.position_encoding != "rope" or c.qk_norm or c.logit_softcap is not None:
        return None  # none of the three stock classes normalises q/k or caps the logits
    if not c.moe_layer_indices():
        return "mistral" if c.sliding_window is not None else "llama"
    return None if _mixtral_blockers(c) else "mixtral"


def stock_config(c: H64LMConfig, architecture: str, **overrides):
    """H64LMConfig -> the transformers config of `architecture` (`overrides` win)."""
    import transformers

    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, attention_dropout=c.dropout, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    if architecture == "mixtral":
        kwargs.update(intermediate_size=c.expert_intermediate_size,
                      num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
                      sliding_window=c.sliding_window, router_jitter_noise=0.0,
                      router_aux_loss_coef=c.router_aux_loss_coef)
        cls = transformers.MixtralConfig
    elif architecture == "mistral":
        kwargs.update(intermediate_size=c.intermediate_size, sliding_window=c.sliding_window)
        cls = transformers.MistralConfig
    elif architecture == "llama":
        kwargs.update(intermediate_size=c.intermediate_size, attention_bias=False,
                      mlp_bias=False)
        cls = transformers.LlamaConfig
    else:
        raise ValueError(f"architecture={architecture!r} must be one of "
                         f"{', '.join(STOCK_ARCHITECTURES)}")
    return cls(**{**kwargs, **overrides})


def to_stock_state_dict(ours: Tensors, c: H64LMConfig, architecture: str) -> Tensors:
    """Our state dict -> the stock model's. Ours fuses W_qkv and [W_gate; W_up] and stores
    experts as x @ W ([E, d, 2I], [E, I, d]); HF splits them and stores experts as x @ W^T."""
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": ours["embed_tokens.weight"],
           "model.norm.weight": ours["norm.weight"], "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "ffn_norm.weight"]
        q, k, v = ours[src + "attn.qkv_proj.weight"].split((q_dim, kv_dim, kv_dim))
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[f"{dst}self_attn.{name}.weight"] = w
        out[dst + "self_attn.o_proj.weight"] = ours[src + "attn.o_proj.weight"]
        if architecture == "mixtral":
            out[dst + "mlp.gate.weight"] = ours[src + "ffn.router.weight"]
            for name in ("gate_up_proj", "down_proj"):
                out[f"{dst}mlp.experts.{name}"] = ours[f"{src}ffn.experts.{name}"].transpose(1, 2)
        else:
            gate, up = ours[src + "ffn.gate_up_proj.weight"].chunk(2)
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
            out[dst + "mlp.down_proj.weight"] = ours[src + "ffn.down_proj.weight"]
    return out


def from_stock_state_dict(hf: Tensors, c: H64LMConfig, architecture: str) -> Tensors:
    """The inverse of `to_stock_state_dict`."""
    out = {"embed_tokens.weight": hf["model.embed_tokens.weight"],
           "norm.weight": hf["model.norm.weight"],
           "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "attn.qkv_proj.weight"] = torch.cat(
            [hf[f"{src}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[dst + "attn.o_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        if architecture == "mixtral":
            out[dst + "ffn.router.weight"] = hf[src + "mlp.gate.weight"]
            for name in ("gate_up_proj", "down_proj"):
                out[f"{dst}ffn.experts.{name}"] = hf[f"{src}mlp.experts.{name}"].transpose(1, 2)
        else:
            out[dst + "ffn.gate_up_proj.weight"] = torch.cat(
                (hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]))
            out[dst + "ffn.down_proj.weight"] = hf[src + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def to_hf_stock(model: H64LMForCausalLM, architecture: Optional[str] = None, **config_overrides):
    """The stock transformers model computing the same function as `model` (its device, dtype
    and train/eval mode). `architecture` defaults to `stock_architecture(model.config)`."""
    import transformers

    c = model.config
    architecture = architecture or stock_architecture(c)
    if architecture is None:
        raise ValueError("no stock transformers class expresses this variant exactly: "
                         + "; ".join(_mixtral_blockers(c)))
    classes = {"mixtral": transformers.MixtralForCausalLM,
               "mistral": transformers.MistralForCausalLM, "llama": transformers.LlamaForCausalLM}
    param = next(model.parameters())
    hf = classes[architecture](stock_config(c, architecture, **config_overrides))
    hf.to(device=param.device, dtype=param.dtype)
    hf.load_state_dict(to_stock_state_dict(model.state_dict(), c, architecture), strict=True)
    return hf.train(model.training)


def to_hf_mixtral(model: H64LMForCausalLM, **config_overrides):
    """A `MixtralForCausalLM` equal to `model`; ValueError naming every option Mixtral lacks."""
    blockers = _mixtral_blockers(model.config)
    if blockers:
        raise ValueError("no Mixtral equivalent: " + "; ".join(blockers))
    return to_hf_stock(model, "mixtral", **config_overrides)
