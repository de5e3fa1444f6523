"""Write a trained H64LM model as a Hugging Face folder that transformers, lm-eval and the hub read.

A stock class (Mixtral, Llama, Mistral; see `stock.py`) when one expresses the variant exactly,
otherwise our own `modeling_h64lm.py` + `configuration_h64lm.py`, copied into the folder and
named in `auto_map` (load with `trust_remote_code=True`).
"""

from pathlib import Path
from typing import Any, Dict, Union

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

from .stock import stock_architecture, to_hf_stock

__all__ = ["check_exportable", "custom_config", "export_hf", "hf_tokenizer", "to_hf_custom", "to_hf_model"]

CUSTOM = "h64lm"


def custom_config(c: H64LMConfig, **extra):
    """H64LMConfig -> H64LMHFConfig (the custom format's config.json)."""
    from .configuration_h64lm import H64LMHFConfig

    return H64LMHFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size, moe_intermediate_size=c.expert_intermediate_size,
        num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
        moe_layer_ids=c.moe_layer_indices(), num_shared_experts=c.num_shared_experts,
        capacity_factor=c.capacity_factor, eval_capacity_factor=c.eval_capacity_factor,
        norm_topk_prob=c.normalize_topk, max_position_embeddings=c.max_position_embeddings,
        position_encoding=c.position_encoding, rope_theta=c.rope_theta,
        attention_window=c.sliding_window, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        qk_norm=c.qk_norm, logit_softcap=c.logit_softcap, weight_init=c.init, **extra)


def check_exportable(c: H64LMConfig) -> None:
    """Routing options no exported format expresses yet fail in one line, before any file is written."""
    unsupported = [f"model.{k}={v!r}" for k, v, ok in [
        ("router_score", c.router_score, c.router_score == "softmax"),
        ("router_bias_update_rate", c.router_bias_update_rate, c.router_bias_update_rate == 0),
        ("capacity_priority", c.capacity_priority, c.capacity_priority == "token")] if not ok]
    if unsupported and c.moe_layer_indices():
        raise ValueError(f"cannot export to Hugging Face format: {', '.join(unsupported)} has no exported "
                         "equivalent yet (softmax scores, no selection bias and token-order capacity only)")


@torch.no_grad()
def to_hf_custom(model: H64LMForCausalLM):
    """The custom-format transformers model equal to `model` (same device, dtype and mode)."""
    from .modeling_h64lm import H64LMHFForCausalLM

    check_exportable(model.config)
    hf = H64LMHFForCausalLM(custom_config(model.config))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    state = {k if k.startswith("lm_head.") else "model." + k: v
             for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.train(model.training)


def to_hf_model(model: H64LMForCausalLM):
    """A stock transformers model when one is exact, else the custom one."""
    return to_hf_custom(model) if stock_architecture(model.config) is None else to_hf_stock(model)


def hf_tokenizer(tokenizer: Any):
    """A tokenizer folder, our `h64lm.data.tokenizer.Tokenizer`, or a HF tokenizer -> HF tokenizer."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return getattr(tokenizer, "hf", tokenizer)


def export_hf(model: H64LMForCausalLM, tokenizer: Any, out_dir: Union[str, Path],
              max_shard_size: Union[int, str] = "2GB") -> Dict[str, Any]:
    """Write config.json, model.safetensors (sharded with model.safetensors.index.json past
    `max_shard_size`), generation_config.json and the tokenizer files into `out_dir`.

    Returns {"out_dir", "architecture" (mixtral/mistral/llama/h64lm), "trust_remote_code",
    "files"}."""
    from transformers import GenerationConfig

    tok = hf_tokenizer(tokenizer)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} ids but model.vocab_size="
                         f"{model.config.vocab_size}: export the tokenizer the model was trained with")
    architecture = stock_architecture(model.config) or CUSTOM
    hf = to_hf_model(model).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = (
        tok.bos_token_id, eos, pad)
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                            pad_token_id=pad)
    if architecture == CUSTOM:  # copies modeling/configuration_h64lm.py, writes auto_map
        hf.config.register_for_auto_class()
        hf.register_for_auto_class("AutoModelForCausalLM")
    out = Path(out_dir)
    hf.save_pretrained(str(out), max_shard_size=max_shard_size)
    tok.save_pretrained(str(out))
    return {"out_dir": str(out), "architecture": architecture,
            "trust_remote_code": architecture == CUSTOM,
            "files": sorted(p.name for p in out.iterdir())}
