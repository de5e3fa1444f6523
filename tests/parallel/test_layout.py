"""ParallelLayout: hardware.* checked once, in one line naming the key, before any process-group work."""

import pytest

from h64lm.parallel import STRATEGIES, ParallelLayout
from h64lm.validation import ConfigError


@pytest.mark.parametrize("world, ep, experts, match", [
    (4, 3, 6, "hardware.ep=3 must divide the world size 4"),
    (4, 4, 6, "hardware.ep=4 must divide model.num_experts=6"),
    (2, 0, 8, "hardware.ep=0 must be >= 1"),
])
def test_bad_ep_is_one_line_naming_the_key(world, ep, experts, match):
    with pytest.raises(ConfigError, match=match) as err:
        ParallelLayout(world, "ddp", ep, experts)
    assert "\n" not in str(err.value)


def test_good_layouts_pass():
    for world, ep in [(1, 1), (2, 2), (8, 4), (8, 1)]:
        layout = ParallelLayout(world, "fsdp", ep, 8)
        assert layout.edp * layout.ep == world


def test_unknown_strategy_rejected():
    with pytest.raises(ConfigError, match="hardware.strategy='zero3' must be one of"):
        ParallelLayout(1, "zero3")
    assert "fsdp" in STRATEGIES


def test_ep_on_a_dense_model_rejected():
    with pytest.raises(ConfigError, match="hardware.ep=2 needs MoE layers"):
        ParallelLayout(2, "ddp", 2, 8, has_moe=False)


def test_sharded_only_when_weights_are_split():
    assert not ParallelLayout(1, "fsdp", 1, 8).sharded
    assert not ParallelLayout(4, "ddp", 1, 8).sharded
    assert ParallelLayout(4, "ddp", 2, 8).sharded and ParallelLayout(2, "fsdp", 1, 8).sharded
