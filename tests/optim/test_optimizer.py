"""Learning-rate schedules against their formulas; weight decay only on matrices."""

import math

import pytest
import torch
from torch import nn

from h64lm.config import OptimConfig
from h64lm.optim.optimizer import build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_is_linear_from_lr_over_warmup():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine")
    assert [lr_factor(s, cfg, 100) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("step", [10, 30, 55, 99, 100])
def test_cosine_matches_formula(step):
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    progress = (step - 10) / 90
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    assert lr_factor(step, cfg, 100) == pytest.approx(expected)


def test_linear_and_constant():
    lin = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(50, lin, 100) == pytest.approx(0.5)
    assert lr_factor(100, lin, 100) == pytest.approx(0.0)
    const = OptimConfig(warmup_steps=5, schedule="constant")
    assert lr_factor(70, const, 100) == 1.0


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    cfg = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, cfg, 100) == 1.0
    assert lr_factor(79, cfg, 100) == 1.0
    assert lr_factor(90, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(4, 4)
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, schedule="cosine")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, 20)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2 * lr_factor(s, cfg, 20) for s in range(6)])


def test_weight_decay_only_on_matrices_not_norms_biases_or_embeddings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4, bias=True)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    m = M()
    decay, no_decay = param_groups(m, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(m.proj.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    all_ids = decayed | {id(p) for p in no_decay["params"]}
    assert all_ids == {id(p) for p in m.parameters()}  # tied weight counted once
