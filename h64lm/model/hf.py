"""Export to Hugging Face `MixtralForCausalLM`: the same network with the weights copied over.

Used as an independent reference (equivalence tests, the speed benchmark). Only configurations
that Mixtral can express are accepted: every layer sparse, RoPE only, no shared experts, no
capacity limit. `transformers` is imported lazily so the model package does not depend on it.
"""

import torch

from .config import H64LMConfig
from .model import H64LMForCausalLM

__all__ = ["copy_attention_and_norms", "mixtral_config", "to_hf_mixtral"]


def mixtral_config(config: H64LMConfig, **overrides):
    """H64LMConfig -> transformers.MixtralConfig of the same network (`overrides` win)."""
    from transformers import MixtralConfig

    c = config
    unsupported = []
    if c.moe_layer_indices() != list(range(c.num_layers)):
        unsupported.append(f"model.moe_layers={c.moe_layers!r} (Mixtral needs 'all')")
    if c.position_encoding != "rope":
        unsupported.append(f"model.position_encoding={c.position_encoding!r} (needs 'rope')")
    if c.num_shared_experts:
        unsupported.append(f"model.num_shared_experts={c.num_shared_experts} (needs 0)")
    if c.capacity_factor is not None:
        unsupported.append(f"model.capacity_factor={c.capacity_factor} (needs null)")
    if unsupported:
        raise ValueError("no Mixtral equivalent: " + "; ".join(unsupported))
    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.expert_intermediate_size, num_local_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_token,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, sliding_window=c.sliding_window,
        router_jitter_noise=0.0, router_aux_loss_coef=c.router_aux_loss_coef,
        attention_dropout=c.dropout,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    return MixtralConfig(**{**kwargs, **overrides})


@torch.no_grad()
def copy_attention_and_norms(model: H64LMForCausalLM, hf) -> None:
    """Copy what every Llama-family HF model shares with ours: embeddings, norms, attention, head.

    Ours stores a fused W_qkv; HF stores separate q/k/v projections, so the copy splits it.
    """
    cfg = model.config
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hf.model.embed_tokens.weight.copy_(model.embed_tokens.weight)
    hf.model.norm.weight.copy_(model.norm.weight)
    if hf.lm_head.weight is not hf.model.embed_tokens.weight:
        hf.lm_head.weight.copy_(model.lm_head.weight)
    for block, layer in zip(model.layers, hf.model.layers):
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        q, k, v = block.attn.qkv_proj.weight.split((q_dim, kv_dim, kv_dim))
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(block.attn.o_proj.weight)


@torch.no_grad()
def to_hf_mixtral(model: H64LMForCausalLM, **config_overrides):
    """A `MixtralForCausalLM` computing the same function as `model` (on its device and dtype).

    Ours stores experts as x @ W ([E, d, 2I], [E, I, d]); Mixtral as x @ W^T ([E, 2I, d],
    [E, d, I]): the copy transposes them.
    """
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM(mixtral_config(model.config, **config_overrides))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    copy_attention_and_norms(model, hf)
    for block, layer in zip(model.layers, hf.model.layers):
        layer.mlp.gate.weight.copy_(block.ffn.router.weight)
        layer.mlp.experts.gate_up_proj.copy_(block.ffn.experts.gate_up_proj.transpose(1, 2))
        layer.mlp.experts.down_proj.copy_(block.ffn.experts.down_proj.transpose(1, 2))
    return hf.train(model.training)
