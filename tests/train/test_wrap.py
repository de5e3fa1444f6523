"""Training techniques applied from outside the model: activation checkpointing changes memory,
never the numbers or the checkpoint names."""

import pytest
import torch

from h64lm.objectives.lm import lm_loss
from h64lm.train.wrap import apply_activation_checkpointing
from tests.model.conftest import build


def test_activation_checkpointing_gives_same_loss_gradients_and_names():
    ids = torch.randint(0, 97, (2, 10))
    results = []
    for checkpointed in (False, True):
        model = build().train()
        names = list(model.state_dict())
        if checkpointed:
            apply_activation_checkpointing(model)
            assert list(model.state_dict()) == names  # checkpoints interchangeable
        out = model(ids, labels=ids)
        loss = lm_loss(out, model.config)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_activation_checkpointing_stores_fewer_activations():
    """What backward keeps: every block's intermediates without checkpointing, only each block's
    input with it (counted through autograd's saved-tensor hooks)."""
    ids = torch.randint(0, 97, (2, 32))

    def saved_bytes(model) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids)
        return sum(total)

    plain = saved_bytes(build().train())
    model = build().train()
    apply_activation_checkpointing(model)
    assert saved_bytes(model) < 0.5 * plain
