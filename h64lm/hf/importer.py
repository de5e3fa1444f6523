"""Read a Hugging Face folder into H64LM: `train.init_from=hf:DIR`.

Accepted: Mixtral, Mistral/Llama (dense) and our own exported format (`model_type: h64lm`).
Stock folders are loaded through their transformers class, which also converts legacy layouts
(e.g. Mixtral's per-expert w1/w2/w3 files); our format is read straight from its safetensors, so
no code from the folder runs. An option our network does not have fails with one line naming it.
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

from .stock import STOCK_ARCHITECTURES, from_stock_state_dict

__all__ = ["import_hf", "load_hf_model"]

Tensors = Dict[str, torch.Tensor]


def _unsupported_stock_options(hf) -> List[str]:
    """What a stock config sets that H64LM cannot compute."""
    bad = []
    if getattr(hf, "hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf.hidden_act!r} (needs 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            bad.append(f"{flag}=true")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        bad.append(f"rope_type={rope['rope_type']!r} (rope scaling; needs 'default')")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        bad.append(f"head_dim={head_dim} (needs hidden_size / num_attention_heads)")
    if getattr(hf, "layer_types", None) and len(set(hf.layer_types)) > 1:
        bad.append(f"layer_types mixing {sorted(set(hf.layer_types))}")
    return bad


def _stock_config(hf, architecture: str) -> H64LMConfig:
    bad = _unsupported_stock_options(hf)
    if bad:
        raise ValueError(f"cannot import this {architecture} folder into H64LM: unsupported "
                         + "; ".join(bad))
    kwargs = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, moe_intermediate_size=None,
        max_position_embeddings=hf.max_position_embeddings, position_encoding="rope",
        rope_theta=float((hf.rope_parameters or {}).get("rope_theta", 10000.0)),
        sliding_window=getattr(hf, "sliding_window", None), rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        initializer_range=hf.initializer_range)
    if architecture == "mixtral":
        kwargs.update(moe_layers="all", num_experts=hf.num_local_experts,
                      num_experts_per_token=hf.num_experts_per_tok,
                      router_norm_topk=True,  # Mixtral renormalises at every k
                      # HF normalises f_i by N (k at balance), ours by N*k (1): ours = k x HF's
                      router_aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok)
    else:
        kwargs.update(moe_layers="none")
    return H64LMConfig(**kwargs)


def _custom_config(raw: dict) -> H64LMConfig:
    moe = raw["moe_layer_ids"]
    return H64LMConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"], intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=raw["num_local_experts"], num_experts_per_token=raw["num_experts_per_tok"],
        moe_layers=list(moe) if moe else "none", num_shared_experts=raw["num_shared_experts"],
        capacity_factor=raw["capacity_factor"], eval_capacity_factor=raw.get("eval_capacity_factor"),
        # None (our default: renormalise when k > 1) where the folder's choice equals the default
        router_norm_topk=(None if raw.get("norm_topk_prob", True) == (raw["num_experts_per_tok"] > 1)
                          else raw.get("norm_topk_prob", True)),
        max_position_embeddings=raw["max_position_embeddings"],
        position_encoding=raw["position_encoding"], rope_theta=raw["rope_theta"],
        sliding_window=raw["attention_window"], rms_norm_eps=raw["rms_norm_eps"],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        initializer_range=raw["initializer_range"], qk_norm=raw.get("qk_norm", False),
        logit_softcap=raw.get("logit_softcap"), init=raw.get("weight_init", "normal"))


def _read_safetensors(folder: Path) -> Tensors:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    state: Tensors = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def import_hf(path: Union[str, Path]) -> Tuple[H64LMConfig, Tensors]:
    """A HF folder -> (H64LMConfig derived from its config.json, our state dict)."""
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"hf:{folder} has no config.json: pass a Hugging Face model folder")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type == "h64lm":
        config = _custom_config(raw)
        hf_state = _read_safetensors(folder)
        state = {k.removeprefix("model."): v for k, v in hf_state.items()}
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])  # tied: saved once
        return config, state
    if model_type not in STOCK_ARCHITECTURES:
        raise ValueError(f"cannot import hf:{folder}: model_type={model_type!r} is unsupported "
                         f"(supported: h64lm, {', '.join(STOCK_ARCHITECTURES)})")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _stock_config(AutoConfig.from_pretrained(str(folder), local_files_only=True),
                           model_type)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype="auto")
    return config, from_stock_state_dict(hf.state_dict(), config, model_type)


def load_hf_model(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> H64LMForCausalLM:
    """`import_hf` + an H64LMForCausalLM holding the weights (eval mode, `dtype`)."""
    config, state = import_hf(path)
    model = H64LMForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()
