"""h64lm.model.architecture: equal networks written differently compare equal, training-time
settings never count, and every weight-relevant difference is named by its option."""

import dataclasses

import pytest

from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.model.architecture import TRAINING_SETTINGS, architecture, architecture_differences

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
             intermediate_size=48, moe_intermediate_size=24, num_experts=4)


def shapes(c: H64LMConfig) -> dict:
    return {k: tuple(v.shape) for k, v in H64LMForCausalLM(c).state_dict().items()}


@pytest.mark.parametrize("a,b", [
    (dict(moe_layers="alternate"), dict(moe_layers=[3, 1])),  # a mode and the list it resolves to
    (dict(moe_layers="all", intermediate_size=48), dict(moe_layers="all", intermediate_size=999)),  # unused width
    (dict(router_norm_topk=None), dict(router_norm_topk=True)),  # automatic at k = 2 is renormalise
    (dict(position_encoding="alibi", rope_theta=10000.0), dict(position_encoding="alibi", rope_theta=5.0)),
    (dict(moe_layers="none", num_experts=4), dict(moe_layers="none", num_experts=8)),  # no MoE layer
    (dict(moe_intermediate_size=None, intermediate_size=48), dict(moe_intermediate_size=48, intermediate_size=48)),
])
def test_equal_networks_written_differently_are_equal(a, b):
    ca, cb = H64LMConfig(**{**SMALL, **a}), H64LMConfig(**{**SMALL, **b})
    assert ca != cb
    assert architecture_differences(architecture(ca), architecture(cb)) == []
    assert shapes(ca) == shapes(cb)  # the independent check: the weights really are interchangeable


def test_training_settings_are_not_architecture():
    base = H64LMConfig(**SMALL)
    changed = dataclasses.replace(
        base, router_aux_loss_coef=0.5, router_z_loss_coef=0.0, router_aux_loss_scope="global",
        capacity_factor=1.25, eval_capacity_factor=2.0, capacity_priority="choice",
        router_bias_update_rate=0.001, dropout=0.1, gradient_checkpointing=True, init="small",
        initializer_range=0.5)
    assert architecture(changed) == architecture(base)
    assert {"dropout", "router_bias_update_rate", "capacity_factor"} <= TRAINING_SETTINGS


@pytest.mark.parametrize("change,line", [
    (dict(num_experts=8), "model.num_experts (4 -> 8)"),
    (dict(moe_layers="all"), "model.moe_layers ([1, 3] -> [0, 1, 2, 3])"),
    (dict(router_norm_topk=False), "model.router_norm_topk (True -> False)"),
    (dict(moe_layers="none"), "model.moe_intermediate_size (24 -> -)"),
    (dict(hidden_size=64), "model.hidden_size (32 -> 64)"),
    (dict(qk_norm=True), "model.qk_norm (False -> True)"),
    (dict(router_score="sigmoid"), "model.router_score (softmax -> sigmoid)"),
])
def test_differences_name_the_option(change, line):
    base = H64LMConfig(**SMALL)
    assert line in architecture_differences(architecture(base), architecture(dataclasses.replace(base, **change)))
