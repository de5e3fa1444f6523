"""Routing diagnostics against direct formulas and a naive recount."""

import math

import pytest
import torch

from h64lm.model.moe.stats import (
    load_entropy,
    load_matrix,
    load_max_over_mean,
    plot_load_heatmap,
    router_entropy,
    routing_snapshot,
    top1_changed,
)


def test_pure_metrics_match_formulas():
    counts = torch.tensor([6, 2, 0, 0])
    assert load_max_over_mean(counts) == pytest.approx(3.0)
    assert load_entropy(counts) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert load_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert router_entropy(probs) == pytest.approx(math.log(2) / 2)
    assert top1_changed(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 0.5


def test_snapshot_recounts_routing_and_tracks_changes(small_model):
    model = small_model(moe_layers="all", router_bias_update_rate=0.1).train()
    windows = [torch.randint(0, 97, (2, 10)) for _ in range(2)]
    first = routing_snapshot(model, windows)
    assert model.training  # the mode is restored
    router = model.layers[1].ffn.router
    x = []
    hook = router.register_forward_hook(lambda m, i, o: x.append(i[0]))
    model.eval()(windows[0])
    hook.remove()
    probs = (x[0] @ router.weight.T).softmax(-1)
    assert torch.equal(first["top1"][1][:20], probs.argmax(-1))
    metrics = first["layers"]["1"]
    assert sum(metrics["load"]) == pytest.approx(1.0)
    assert metrics["bias"] == [0.0] * 4 and "top1_changed" not in metrics
    assert metrics["router_entropy"] <= math.log(4)
    with torch.no_grad():
        router.bias[0] = 10.0  # every token now selects expert 0 first
    second = routing_snapshot(model, windows, previous=first)
    expected = (first["top1"][1] != 0).float().mean().item()
    assert second["layers"]["1"]["top1_changed"] == pytest.approx(expected)
    assert second["layers"]["1"]["load_max_over_mean"] >= 2.0


def test_load_heatmap_matrix_and_file(tmp_path):
    records = [{"step": s, "router": {"1": {"load": [0.5, 0.25, 0.25, 0.0]},
                                      "3": {"load": [0.25] * 4}}} for s in (1, 2, 3)]
    steps, labels, ratio = load_matrix(records)
    assert steps == [1, 2, 3] and labels[0] == "L1 e0" and ratio.shape == (8, 3)
    assert ratio[:4, 0].tolist() == [2.0, 1.0, 1.0, 0.0] and ratio[4:].min() == 1.0
    plot_load_heatmap(records, tmp_path / "load.png")
    assert (tmp_path / "load.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="router loads"):
        plot_load_heatmap([{"step": 1}], tmp_path / "none.png")
