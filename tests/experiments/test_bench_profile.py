"""experiments/profile_experts.py counts what a step runs, per op, at each expert count."""

import torch

from experiments.profile_experts import main, profile_ops


def test_profile_ops_counts_calls_per_step():
    a, b = torch.randn(8, 8), torch.randn(8, 8)

    def step():
        for _ in range(3):
            a @ b

    ops = profile_ops(step, steps=2)
    assert ops["aten::mm"][1] == 3  # calls per step, not over both profiled steps
    assert ops["aten::mm"][0] >= 0


def test_expert_products_grow_with_the_expert_count(capsys):
    ops = main(["--size", "smoke", "--hidden", "0", "--experts", "2", "8", "--batch", "2",
                "--seq", "16", "--steps", "1", "--top", "5"])
    # torch's CPU grouped product runs one matrix product per expert that received rows, so the
    # per-step count of aten::mm must rise with the expert count (by up to 6 per added expert
    # and MoE layer: two forward products, each with two in backward)
    calls = {n: ops["ours"][n]["aten::mm"][1] for n in (2, 8)}
    assert calls[8] > calls[2]
    assert calls[8] - calls[2] <= 6 * (8 - 2) * 2  # the smoke model has 2 MoE layers
    assert "E=8 ms" in capsys.readouterr().out
