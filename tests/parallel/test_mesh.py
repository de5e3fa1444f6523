"""Layout checks fail early, in one line naming hardware.ep."""

import pytest

from h64lm.parallel import STRATEGIES, build_parallel_model, check_layout


@pytest.mark.parametrize("world, ep, experts, match", [
    (4, 3, 6, "hardware.ep=3 must divide the world size 4"),
    (4, 4, 6, "hardware.ep=4 must divide model.num_experts=6"),
    (2, 0, 8, "hardware.ep=0 must be >= 1"),
])
def test_bad_ep_is_one_line_naming_the_key(world, ep, experts, match):
    with pytest.raises(ValueError, match=match) as err:
        check_layout(world, ep, experts)
    assert "\n" not in str(err.value)


def test_good_layouts_pass():
    for world, ep in [(1, 1), (2, 2), (8, 4), (8, 1)]:
        check_layout(world, ep, 8)


def test_unknown_strategy_rejected_before_building():
    built = []
    with pytest.raises(ValueError, match="hardware.strategy='zero3' must be one of"):
        build_parallel_model(lambda: built.append(1), None, "zero3", 0, None)
    assert built == [] and "fsdp" in STRATEGIES
