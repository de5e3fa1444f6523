"""The activation model against what autograd really saves (saved-tensor hooks) and what stays
alive after forward (a storage tracker): exact without checkpointing for the dropless paths,
within 1% with checkpointing, within 10% with a capacity factor (approximated)."""

import pytest
import torch

from h64lm.model import H64LMForCausalLM
from h64lm.model.config import H64LMConfig
from h64lm.objectives.lm import lm_loss
from h64lm.plan.activations import activation_bytes
from h64lm.plan.measure import autocast_for, measure_retained, measure_saved
from h64lm.train.wrap import apply_activation_checkpointing

BASE = dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
            intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_shared_experts=1,
            max_position_embeddings=256)
EXACT = {
    "moe_alternate_shared": {},
    "moe_all_no_shared": dict(moe_layers="all", num_shared_experts=0, num_experts_per_token=1),
    "dense": dict(moe_layers="none", tie_word_embeddings=True),
    "alibi": dict(position_encoding="alibi"),
    "window": dict(sliding_window=16),
    "rope_alibi_mha": dict(position_encoding="rope+alibi", num_kv_heads=4),
}
B, T = 2, 64


def _setup(overrides, checkpointing, precision):
    config = H64LMConfig(**{**BASE, **overrides, "gradient_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = H64LMForCausalLM(config).train()
    if checkpointing:  # the trainer applies it from outside the model
        apply_activation_checkpointing(model)
    x = torch.randint(0, config.vocab_size, (B, T))

    def forward():
        with autocast_for(precision, "cpu"):
            return lm_loss(model(x, labels=x, return_logits=False), config)
    return config, model, forward


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", EXACT)
def test_saved_bytes_exact(name, precision):
    config, model, forward = _setup(EXACT[name], False, precision)
    measured = measure_saved(forward, model.parameters())
    assert activation_bytes(config, B, T, precision).saved == measured.activations


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_retained_bytes_match_hooks(precision):
    """The storage tracker (independent of the hooks) sees the same bytes alive after forward,
    plus autocast's weight copies under bf16."""
    _, model, forward = _setup({}, False, precision)
    saved = measure_saved(forward, model.parameters())
    retained = measure_retained(forward)
    expected = saved.activations + saved.weight_copies
    assert abs(retained - expected) <= 0.002 * expected
    assert (saved.weight_copies > 0) == (precision == "bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["moe_alternate_shared", "alibi", "window"])
def test_checkpointed_bytes_within_1_percent(name, precision):
    config, _, forward = _setup(EXACT[name], True, precision)
    predicted = activation_bytes(config, B, T, precision, checkpointing=True).saved
    measured = measure_retained(forward)
    assert abs(predicted - measured) <= 0.01 * measured


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_capacity_factor_within_10_percent(precision):
    config, model, forward = _setup(dict(capacity_factor=1.0), False, precision)
    measured = measure_saved(forward, model.parameters()).activations
    predicted = activation_bytes(config, B, T, precision).saved
    assert abs(predicted - measured) <= 0.10 * measured


def test_checkpointing_saves_memory_and_recomputes_one_block():
    config = H64LMConfig(**BASE)
    full = activation_bytes(config, 4, 128, "bf16")
    ckpt = activation_bytes(config, 4, 128, "bf16", checkpointing=True)
    assert ckpt.peak < full.saved
    assert ckpt.recompute == full.per_block_max
