"""What a model's weights must match: one canonical comparison for resume, `train.init_from` and
Hugging Face import.

Two configs that write the same network differently (`moe_layers: alternate` and `[1, 3]`; an
automatic `router_norm_topk` and its resolved value; a dense width in a model with no dense
layer) have the same `architecture`. Training-time settings (balancing losses and their scope,
capacity, the aux-free bias rate, dropout, gradient checkpointing) and initialisation are not
architecture: a resumed or initialised run may change them.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, List

from .config import H64LMConfig

__all__ = ["STAGE_HEADS", "TRAINING_SETTINGS", "architecture", "architecture_differences", "architecture_fields"]

# Config fields that change how the model trains (or is initialised), not which weights it has
# or what they compute at evaluation.
TRAINING_SETTINGS = frozenset({
    "gradient_checkpointing", "dropout", "router_aux_loss_coef", "router_z_loss_coef",
    "router_aux_loss_scope", "capacity_factor", "eval_capacity_factor", "capacity_priority",
    "router_bias_update_rate", "init", "initializer_range"})


# The scalar head is the stage's choice (stage=reward, PPO's value): a run initialised from a
# model without one starts it fresh, one from a model with one leaves it out (`initialize_from`).
STAGE_HEADS = frozenset({"score_head"})


def architecture_fields() -> List[str]:
    """The H64LMConfig fields that describe the network's trunk (every field but
    TRAINING_SETTINGS and STAGE_HEADS): what a run takes from an `hf:` folder."""
    return [f.name for f in fields(H64LMConfig) if f.name not in TRAINING_SETTINGS | STAGE_HEADS]


def architecture(c: H64LMConfig) -> Dict[str, Any]:
    """Resolved, canonical values of everything the weights must match, keyed by the config
    option that sets each (so a difference names the option to change). Settings that do not
    apply (a dense width with no dense layer, RoPE's theta under ALiBi, routing with no MoE
    layer) are left out."""
    moe = c.moe_layer_indices()
    arch: Dict[str, Any] = {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads, "num_kv_heads": c.num_kv_heads,
        "moe_layers": moe, "position_encoding": c.position_encoding,
        "sliding_window": c.sliding_window, "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings, "qk_norm": c.qk_norm,
        "logit_softcap": c.logit_softcap, "score_head": c.score_head}
    if c.uses_rope:
        arch["rope_theta"] = c.rope_theta
    if len(moe) < c.num_layers:
        arch["intermediate_size"] = c.intermediate_size
    if moe:
        arch.update(moe_intermediate_size=c.expert_intermediate_size, num_experts=c.num_experts,
                    num_experts_per_token=c.num_experts_per_token,
                    num_shared_experts=c.num_shared_experts, router_score=c.router_score,
                    router_norm_topk=c.normalize_topk)
    return arch


def architecture_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """`architecture` dicts -> one line per differing option, e.g. 'model.num_experts (4 -> 8)';
    an option only one side has shows as absent ('-')."""
    return [f"model.{k} ({saved.get(k, '-')} -> {current.get(k, '-')})"
            for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
