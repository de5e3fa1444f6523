"""Stock transformers classes that express an H64LM variant exactly, and their configs both ways.

Every variant below needs `position_encoding=rope`, no `logit_softcap` and, with MoE layers,
dropless routing (`capacity_factor` and `eval_capacity_factor` null); the first family in this
order whose other conditions hold is chosen (`stock_architecture`):

| family         | MoE layers              | router                                    | other conditions                 |
| llama          | none                    | -                                         | no window, no q/k norm           |
| mistral        | none                    | -                                         | sliding window, no q/k norm      |
| qwen3          | none                    | -                                         | q/k norm, no window              |
| mixtral        | all                     | softmax, top-k renormalised, no bias      | no shared experts, no q/k norm   |
| ernie4_5_moe   | every n-th from s to e  | softmax, top-k renormalised, selection    | no window, no q/k norm           |
|                | (the default: odd ones) | bias or none (aux-free or not)            |                                  |
| qwen2_moe      | any                     | softmax (e.g. Switch top-1), no bias      | no window, no q/k norm           |
| qwen3_moe      | any                     | softmax, no bias                          | q/k norm, no window, no shared   |
| glm4_moe       | all after the first k   | sigmoid, selection bias or none           | no window                        |

Everything else (ALiBi, logit soft-capping, capacity factors, windows with MoE layers other than
Mixtral's, and the layouts/routers the table lacks) goes to the custom format (`modeling_h64lm.py`).
Why each family is exact, and the two weight maps that are not renames (Ernie's interleaved RoPE,
Qwen2-MoE's gated shared expert), are in `stock_weights.py`; tests/hf/test_stock.py checks logits.
`transformers` is imported lazily so the model package does not depend on it.
"""

from typing import Dict, List, Optional

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

from .stock_weights import from_stock_state_dict, to_stock_state_dict

__all__ = ["STOCK_ARCHITECTURES", "from_stock_config", "from_stock_state_dict", "stock_architecture",
           "stock_blockers", "stock_config", "to_hf_mixtral", "to_hf_stock", "to_stock_state_dict"]

# family -> transformers class name prefix (XConfig, XForCausalLM)
STOCK_ARCHITECTURES: Dict[str, str] = {
    "llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3", "mixtral": "Mixtral", "ernie4_5_moe": "Ernie4_5_Moe",
    "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "glm4_moe": "Glm4Moe"}


def ernie_layout(c: H64LMConfig) -> Optional[tuple]:
    """(start, end, interval) with layers {i : s <= i <= e, (i + 1) % n == 0} = the MoE layers."""
    moe = c.moe_layer_indices()
    for n in range(1, c.num_layers + 1):
        if moe and [i for i in range(moe[0], moe[-1] + 1) if (i + 1) % n == 0] == moe:
            return moe[0], moe[-1], n
    return None


def _first_dense(c: H64LMConfig) -> Optional[int]:
    """k when the MoE layers are exactly k, ..., L - 1 (GLM-4.5's `first_k_dense_replace`)."""
    moe = c.moe_layer_indices()
    return moe[0] if moe and moe == list(range(moe[0], c.num_layers)) else None


def _needs(ok: bool, what: str) -> List[str]:
    return [] if ok else [what]


def stock_blockers(c: H64LMConfig, family: str) -> List[str]:
    """What `family` cannot express in `c`, as 'model.option=value (needs ...)' lines."""
    moe = c.moe_layer_indices()
    softmax = c.router_score == "softmax"
    bias = c.router_bias_update_rate > 0
    out = (_needs(c.position_encoding == "rope", f"model.position_encoding={c.position_encoding} (needs rope)")
           + _needs(c.logit_softcap is None, f"model.logit_softcap={c.logit_softcap} (needs null)"))
    if moe:
        out += _needs(c.capacity_factor is None and c.eval_capacity_factor is None,
                      "model.capacity_factor / eval_capacity_factor (needs null: dropless)")
    no_qk = _needs(not c.qk_norm, "model.qk_norm=true (needs false)")
    no_window = _needs(c.sliding_window is None, f"model.sliding_window={c.sliding_window} (needs null)")
    softmax_plain = _needs(softmax and not bias, "model.router_score / router_bias_update_rate (needs softmax, no bias)")
    if family in ("llama", "mistral"):
        return out + _needs(not moe, f"model.moe_layers={c.moe_layers} (needs none)") + no_qk + (
            no_window if family == "llama" else _needs(c.sliding_window is not None, "model.sliding_window (needs one)"))
    if family == "qwen3":
        return (out + no_window + _needs(not moe, f"model.moe_layers={c.moe_layers} (needs none)")
                + _needs(c.qk_norm, "model.qk_norm=false (needs true)"))
    out += _needs(bool(moe), "model.moe_layers=none (needs MoE layers)")
    if family == "mixtral":
        return (out + no_qk + softmax_plain
                + _needs(moe == list(range(c.num_layers)), f"model.moe_layers={c.moe_layers} (needs all)")
                + _needs(not c.num_shared_experts, f"model.num_shared_experts={c.num_shared_experts} (needs 0)")
                + _needs(c.normalize_topk, "model.router_norm_topk off (needs renormalised top-k)"))
    if family == "qwen2_moe":
        return out + no_qk + no_window + softmax_plain
    if family == "qwen3_moe":
        return (out + no_window + softmax_plain + _needs(c.qk_norm, "model.qk_norm=false (needs true)")
                + _needs(not c.num_shared_experts, f"model.num_shared_experts={c.num_shared_experts} (needs 0)"))
    if family == "ernie4_5_moe":
        return (out + no_qk + no_window + _needs(softmax, "model.router_score=sigmoid (needs softmax)")
                + _needs(c.normalize_topk, "model.router_norm_topk off (needs renormalised top-k)")
                + _needs(ernie_layout(c) is not None, f"model.moe_layers={c.moe_layers} (needs every n-th layer)"))
    if family == "glm4_moe":
        return (out + no_window + _needs(not softmax, "model.router_score=softmax (needs sigmoid)")
                + _needs(c.num_experts >= 2, "model.num_experts=1 (needs >= 2)")
                + _needs(_first_dense(c) is not None, f"model.moe_layers={c.moe_layers} (needs the last layers)"))
    raise ValueError(f"architecture={family!r} must be one of {', '.join(STOCK_ARCHITECTURES)}")


def stock_architecture(c: H64LMConfig) -> Optional[str]:
    """The first family of STOCK_ARCHITECTURES that expresses `c` exactly, or None (custom format)."""
    return next((f for f in STOCK_ARCHITECTURES if not stock_blockers(c, f)), None)


def _hf_aux_coef(c: H64LMConfig) -> float:
    # HF normalises f_i by N (k at balance), ours by N*k (1): HF's coefficient is ours / k
    return c.router_aux_loss_coef / c.num_experts_per_token


def _moe_kwargs(c: H64LMConfig, family: str) -> dict:
    moe = c.moe_layer_indices()
    dense = [i for i in range(c.num_layers) if i not in moe]
    width, shared = c.expert_intermediate_size, c.num_shared_experts
    common = dict(moe_intermediate_size=width, num_experts_per_tok=c.num_experts_per_token,
                  router_aux_loss_coef=_hf_aux_coef(c))
    if family == "mixtral":
        return dict(intermediate_size=width, num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
                    sliding_window=c.sliding_window, router_jitter_noise=0.0,
                    router_aux_loss_coef=_hf_aux_coef(c))
    if family in ("qwen2_moe", "qwen3_moe"):
        extra = (dict(shared_expert_intermediate_size=shared * width, qkv_bias=False, use_sliding_window=False)
                 if family == "qwen2_moe" else dict(attention_bias=False, sliding_window=None))
        return dict(common, intermediate_size=c.intermediate_size, num_experts=c.num_experts,
                    norm_topk_prob=c.normalize_topk, decoder_sparse_step=1, mlp_only_layers=dense, **extra)
    if family == "ernie4_5_moe":
        start, end, interval = ernie_layout(c)
        return dict(intermediate_size=c.intermediate_size, moe_intermediate_size=width, moe_k=c.num_experts_per_token,
                    moe_num_experts=c.num_experts, moe_num_shared_experts=shared, moe_layer_start_index=start,
                    moe_layer_end_index=end, moe_layer_interval=interval, moe_norm_min=1e-12, use_bias=False,
                    router_aux_loss_coef=_hf_aux_coef(c))
    return dict(common, intermediate_size=c.intermediate_size, n_routed_experts=c.num_experts,
                n_shared_experts=shared, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                first_k_dense_replace=_first_dense(c), norm_topk_prob=c.normalize_topk,
                use_qk_norm=c.qk_norm, attention_bias=False)


def stock_config(c: H64LMConfig, architecture: str, **overrides):
    """H64LMConfig -> the transformers config of `architecture` (`overrides` win)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if architecture == "glm4_moe":
        rope["partial_rotary_factor"] = 1.0  # GLM rotates half the head by default
    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        hidden_act="silu", rope_parameters=rope)
    if architecture != "ernie4_5_moe":  # Ernie derives it (hidden / heads) and has no field
        kwargs["head_dim"] = c.head_dim
    if architecture == "llama":
        kwargs.update(intermediate_size=c.intermediate_size, attention_bias=False, mlp_bias=False)
    elif architecture == "mistral":
        kwargs.update(intermediate_size=c.intermediate_size, sliding_window=c.sliding_window)
    elif architecture == "qwen3":
        kwargs.update(intermediate_size=c.intermediate_size, attention_bias=False, use_sliding_window=False)
    elif architecture in STOCK_ARCHITECTURES:
        kwargs.update(_moe_kwargs(c, architecture))
    else:
        raise ValueError(f"architecture={architecture!r} must be one of {', '.join(STOCK_ARCHITECTURES)}")
    return getattr(transformers, STOCK_ARCHITECTURES[architecture] + "Config")(**{**kwargs, **overrides})


def _moe_layers_back(hf, family: str) -> List[int]:
    L = hf.num_hidden_layers
    if family == "mixtral":
        return list(range(L))
    if family in ("qwen2_moe", "qwen3_moe"):
        skip = set(hf.mlp_only_layers or [])
        return [i for i in range(L) if i not in skip and (i + 1) % hf.decoder_sparse_step == 0]
    if family == "ernie4_5_moe":
        end = hf.moe_layer_end_index if hf.moe_layer_end_index >= 0 else L - 1
        return [i for i in range(hf.moe_layer_start_index, min(end, L - 1) + 1) if (i + 1) % hf.moe_layer_interval == 0]
    return list(range(hf.first_k_dense_replace, L))


def _moe_settings_back(hf, family: str) -> dict:
    """The routing fields of H64LMConfig that a stock MoE config sets."""
    def get(*names):  # the families name the same setting differently
        return next(getattr(hf, n) for n in names if getattr(hf, n, None) is not None)

    k = get("num_experts_per_tok", "moe_k")
    out = dict(num_experts=get("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
               num_experts_per_token=k, moe_intermediate_size=None if family == "mixtral" else hf.moe_intermediate_size,
               router_norm_topk=bool(getattr(hf, "norm_topk_prob", True)),
               router_score="sigmoid" if family == "glm4_moe" else "softmax",
               router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0) * k)
    width = hf.moe_intermediate_size if family != "mixtral" else hf.intermediate_size
    shared = {"qwen2_moe": lambda: hf.shared_expert_intermediate_size,
              "ernie4_5_moe": lambda: hf.moe_num_shared_experts * width,
              "glm4_moe": lambda: hf.n_shared_experts * width}.get(family, lambda: 0)()
    if shared % width:
        raise ValueError(f"a shared expert of width {shared} is not a whole number of experts of width {width}")
    out["num_shared_experts"] = shared // width
    return out


def _unsupported(hf, family: str) -> List[str]:
    """What a stock config sets that H64LM cannot compute."""
    bad = []
    if getattr(hf, "hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf.hidden_act!r} (needs 'silu')")
    for flag in ("attention_bias", "mlp_bias", "qkv_bias", "use_bias"):
        if getattr(hf, flag, False):
            bad.append(f"{flag}=true")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        bad.append(f"rope_type={rope['rope_type']!r} (rope scaling; needs 'default')")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        bad.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (needs 1.0)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        bad.append(f"head_dim={head_dim} (needs hidden_size / num_attention_heads)")
    if getattr(hf, "layer_types", None) and len(set(hf.layer_types)) > 1:
        bad.append(f"layer_types mixing {sorted(set(hf.layer_types))}")
    if family == "glm4_moe" and (hf.n_group != 1 or hf.topk_group != 1 or hf.routed_scaling_factor != 1.0):
        bad.append("n_group / topk_group / routed_scaling_factor (needs 1, 1, 1.0)")
    if family in ("qwen3", "qwen2_moe", "qwen3_moe") and getattr(hf, "use_sliding_window", False):
        bad.append("use_sliding_window=true")
    return bad


def from_stock_config(hf, family: str) -> H64LMConfig:
    """A stock transformers config -> the H64LMConfig computing the same network; ValueError
    naming every option H64LM lacks."""
    bad = _unsupported(hf, family)
    if bad:
        raise ValueError(f"cannot import this {family} folder into H64LM: unsupported " + "; ".join(bad))
    moe = [] if family in ("llama", "mistral", "qwen3") else _moe_layers_back(hf, family)
    kwargs = dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
        position_encoding="rope", rope_theta=float((hf.rope_parameters or {}).get("rope_theta", 10000.0)),
        sliding_window=getattr(hf, "sliding_window", None) or None, rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(hf.tie_word_embeddings), initializer_range=hf.initializer_range,
        qk_norm=family in ("qwen3", "qwen3_moe") or bool(getattr(hf, "use_qk_norm", False)),
        moe_layers=moe or "none", moe_intermediate_size=None)
    if moe:
        kwargs.update(_moe_settings_back(hf, family))
    return H64LMConfig(**kwargs)


@torch.no_grad()
def to_hf_stock(model: H64LMForCausalLM, architecture: Optional[str] = None, **config_overrides):
    """The stock transformers model computing the same function as `model` (its device, dtype
    and train/eval mode). `architecture` defaults to `stock_architecture(model.config)`."""
    import transformers

    c = model.config
    architecture = architecture or stock_architecture(c)
    if architecture is None:
        raise ValueError("no stock transformers class expresses this variant exactly (the closest general one, "
                         "qwen2_moe, lacks: " + "; ".join(stock_blockers(c, "qwen2_moe")) + ")")
    param = next(model.parameters())
    cls = getattr(transformers, STOCK_ARCHITECTURES[architecture] + "ForCausalLM")
    hf = cls(stock_config(c, architecture, **config_overrides))
    hf.to(device=param.device, dtype=param.dtype)
    state = to_stock_state_dict(model.state_dict(), c, architecture)
    hf.load_state_dict({k: v.to(hf.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return hf.train(model.training)


def to_hf_mixtral(model: H64LMForCausalLM, **config_overrides):
    """A `MixtralForCausalLM` equal to `model`; ValueError naming every option Mixtral lacks."""
    blockers = stock_blockers(model.config, "mixtral")
    if blockers:
        raise ValueError("no Mixtral equivalent: " + "; ".join(blockers))
    return to_hf_stock(model, "mixtral", **config_overrides)
