"""Sparse upcycling (Komatsuzaki et al., 2022): start an MoE model from a trained dense one.

Every dense FFN that becomes an MoE layer is copied into each of its E experts; attention, norms,
embeddings, the LM head and the FFNs that stay dense are copied as they are. The router is
initialised as usual (N(0, initializer_range), seeded): with identical experts and gate weights
that sum to one (`model.router_norm_topk` true, the default at k > 1) the MoE layer computes the
dense FFN exactly, whatever the router picks, so the upcycled model's loss equals the dense one's
at step 0. A zero router would give the same step-0 output but send every token to experts
0..k-1 (topk's tie order), so it is not used.

Shared experts (S of them, stored as one SwiGLU of width S * I): they also receive copies of the
dense FFN, and every down projection (routed and shared) is scaled by 1 / (S + 1): the layer
output is FFN / (S + 1) + S * FFN / (S + 1) = FFN, still exact.

`noise_std` > 0 adds independent N(0, noise_std^2) noise to each routed expert's copy, so the
experts can diverge faster (at the cost of step-0 equivalence).
"""

import re
from typing import Dict

import torch

from .config import H64LMConfig

__all__ = ["upcycle_state_dict"]

_SAME = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
         "position_encoding", "tie_word_embeddings")
_FFN_KEY = re.compile(r"layers\.(\d+)\.ffn\.(gate_up_proj|down_proj)\.weight")


def _check(dense_cfg: H64LMConfig, moe_cfg: H64LMConfig) -> None:
    for name in _SAME:
        if getattr(dense_cfg, name) != getattr(moe_cfg, name):
            raise ValueError(f"upcycling needs the same model.{name}: dense "
                             f"{getattr(dense_cfg, name)!r}, MoE {getattr(moe_cfg, name)!r}")
    if dense_cfg.moe_layer_indices():
        raise ValueError(f"upcycling needs a dense model (model.moe_layers=none), got "
                         f"model.moe_layers={dense_cfg.moe_layers!r}")
    if moe_cfg.expert_intermediate_size != dense_cfg.intermediate_size:
        raise ValueError(f"model.moe_intermediate_size={moe_cfg.expert_intermediate_size} must "
                         f"equal the dense model.intermediate_size={dense_cfg.intermediate_size} "
                         "to copy the dense FFN into each expert")
    if moe_cfg.intermediate_size != dense_cfg.intermediate_size and (
            len(moe_cfg.moe_layer_indices()) < moe_cfg.num_layers):
        raise ValueError(f"model.intermediate_size={moe_cfg.intermediate_size} of the layers that "
                         f"stay dense must equal the dense model's {dense_cfg.intermediate_size}")


def upcycle_state_dict(dense_state: Dict[str, torch.Tensor], dense_cfg: H64LMConfig,
                       moe_cfg: H64LMConfig, noise_std: float = 0.0,
                       seed: int = 0) -> Dict[str, torch.Tensor]:
    """A dense H64LMForCausalLM state dict -> one for H64LMForCausalLM(moe_cfg) (load it with
    strict=True)."""
    _check(dense_cfg, moe_cfg)
    if not noise_std >= 0:
        raise ValueError(f"noise_std={noise_std} must be >= 0")
    sparse = set(moe_cfg.moe_layer_indices())
    g = torch.Generator().manual_seed(seed)
    E, S = moe_cfg.num_experts, moe_cfg.num_shared_experts
    out: Dict[str, torch.Tensor] = {}
    for key, value in dense_state.items():
        match = _FFN_KEY.fullmatch(key)
        if match is None or int(match.group(1)) not in sparse:
            out[key] = value.clone()
            continue
        prefix, proj = f"layers.{match.group(1)}.ffn", match.group(2)
        # dense Linear stores [out, in]; stacked experts multiply x @ w, so [in, out]
        w = value.t() if proj == "gate_up_proj" else value.t() / (S + 1)
        experts = w.expand(E, *w.shape).clone()
        if noise_std > 0:
            experts += noise_std * torch.randn(experts.shape, generator=g).to(experts)
        out[f"{prefix}.experts.{proj}"] = experts
        if S and proj == "gate_up_proj":  # [2I, d] -> gates then ups, each S copies
            gate, up = value.chunk(2)
            out[f"{prefix}.shared.gate_up_proj.weight"] = torch.cat([gate] * S + [up] * S)
        elif S:
            out[f"{prefix}.shared.down_proj.weight"] = torch.cat([value / (S + 1)] * S, dim=1)
        if proj == "gate_up_proj":
            router = torch.randn(E, moe_cfg.hidden_size, generator=g)
            out[f"{prefix}.router.weight"] = (router * moe_cfg.initializer_range).to(value)
            if moe_cfg.router_bias_update_rate > 0:
                out[f"{prefix}.router.bias"] = torch.zeros(E)
    return out
