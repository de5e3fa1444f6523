"""Config validation and the conf/model presets."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from h64lm.model import H64LMConfig, H64LMForCausalLM, active_parameters_per_token, count_parameters

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"


def load_preset(name: str) -> H64LMConfig:
    """Merge a preset onto the structured schema, as Hydra does through `base_config`."""
    raw = OmegaConf.load(PRESETS / f"{name}.yaml") or OmegaConf.create({})
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(H64LMConfig), raw))


@pytest.mark.parametrize("overrides,message", [
    (dict(num_attention_heads=8, num_kv_heads=3),
     r"model.num_kv_heads=3 must divide model.num_attention_heads=8"),
    (dict(hidden_size=100, num_attention_heads=8),
     r"model.num_attention_heads=8 must divide model.hidden_size=100"),
    (dict(num_experts=2, num_experts_per_token=3),
     r"model.num_experts_per_token=3 must be <= model.num_experts=2"),
    (dict(sliding_window=0), r"model.sliding_window=0"),
    (dict(position_encoding="absolute"), r"model.position_encoding='absolute' must be one of"),
    (dict(moe_layers="odd"), r"model.moe_layers='odd'"),
    (dict(moe_layers=[1, 7]), r"model.moe_layers=\[1, 7\].*model.num_layers=4"),
    (dict(capacity_factor=0.0), r"model.capacity_factor=0.0"),
    (dict(num_layers=0), r"model.num_layers=0 must be >= 1"),
    (dict(dropout=1.0), r"model.dropout=1.0"),
    (dict(num_shared_experts=-1), r"model.num_shared_experts=-1"),
    (dict(hidden_size=24, num_attention_heads=8, num_kv_heads=8), r"must be even"),
    (dict(router_aux_loss_coef=-0.1), r"model.router_aux_loss_coef=-0.1"),
])
def test_invalid_config_raises_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        H64LMConfig(**{"num_layers": 4, **overrides})


def test_moe_layer_selection():
    assert H64LMConfig(num_layers=6, moe_layers="alternate").moe_layer_indices() == [1, 3, 5]
    assert H64LMConfig(num_layers=3, moe_layers="all").moe_layer_indices() == [0, 1, 2]
    assert H64LMConfig(num_layers=3, moe_layers="none").moe_layer_indices() == []
    assert H64LMConfig(num_layers=5, moe_layers=[4, 0]).moe_layer_indices() == [0, 4]


@pytest.mark.parametrize("name", ["tiny", "demo", "moe_1b", "moe_7b"])
def test_preset_loads_through_schema_and_counts_match_model(name):
    cfg = load_preset(name)
    assert isinstance(cfg, H64LMConfig)
    with torch.device("meta"):
        model = H64LMForCausalLM(cfg)
    assert count_parameters(model) == count_parameters(cfg)
    assert active_parameters_per_token(cfg) < count_parameters(cfg)


def test_demo_preset_has_249m_parameters():
    total = count_parameters(load_preset("demo"))
    assert abs(total - 249e6) / 249e6 < 0.01, total


def test_typo_in_model_config_is_rejected():
    with pytest.raises(Exception, match="hiden_size"):
        OmegaConf.merge(OmegaConf.structured(H64LMConfig), {"hiden_size": 64})


def test_active_parameters_skip_unchosen_experts():
    cfg = H64LMConfig(vocab_size=10, hidden_size=8, num_layers=2, num_attention_heads=2,
                      num_kv_heads=1, intermediate_size=12, moe_intermediate_size=6,
                      num_experts=5, num_experts_per_token=2, moe_layers=[1])
    assert count_parameters(cfg) - active_parameters_per_token(cfg) == 3 * (3 * 8 * 6)
