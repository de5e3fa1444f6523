"""Parameter, gradient and optimizer (AdamW, Muon) bytes: the planner's counts equal the measured ones exactly."""

import math

import pytest
import torch

from h64lm.config import OptimConfig
from h64lm.model import H64LMForCausalLM
from h64lm.model.config import H64LMConfig
from h64lm.objectives.lm import lm_loss
from h64lm.optim.optimizer import build_optimizer, param_groups
from h64lm.plan.measure import measure_state
from h64lm.plan.params import parameter_shapes, state_bytes

SMALL = dict(vocab_size=256, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2,
             intermediate_size=64, moe_intermediate_size=24, num_experts=4,
             max_position_embeddings=64)
CONFIGS = {
    "moe_alternate_tied": dict(tie_word_embeddings=True),
    "moe_all_shared_untied": dict(moe_layers="all", num_shared_experts=2),
    "dense": dict(moe_layers="none"),
    "moe_top1_tied_shared": dict(moe_layers=[0, 2], num_experts_per_token=1,
                                 num_shared_experts=1, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fused", [True, False])
def test_state_bytes_equal_measured(name, fused):
    config = H64LMConfig(**SMALL, **CONFIGS[name])
    torch.manual_seed(0)
    model = H64LMForCausalLM(config)
    # the trainer's optimizer: AdamW over param_groups, fused where available
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=fused,
                                  foreach=None if fused else True)
    x = torch.randint(0, config.vocab_size, (2, 16))
    measured = measure_state(model, optimizer,
                             lambda: lm_loss(model(x, labels=x, return_logits=False), config))
    planned = state_bytes(config)
    assert (planned.params, planned.grads, planned.optimizer) == (
        measured["params"], measured["grads"], measured["optimizer"])


@pytest.mark.parametrize("name", CONFIGS)
def test_muon_state_bytes_equal_measured(name):
    """optim=muon: one momentum buffer per Muon matrix, AdamW's moments + step on the rest."""
    config = H64LMConfig(**SMALL, **CONFIGS[name])
    torch.manual_seed(0)
    model = H64LMForCausalLM(config)
    optimizer = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    x = torch.randint(0, config.vocab_size, (2, 16))
    measured = measure_state(model, optimizer, lambda: lm_loss(model(x, labels=x, return_logits=False), config))
    planned, adamw = state_bytes(config, optim="muon"), state_bytes(config)
    assert (planned.params, planned.grads, planned.optimizer) == (
        measured["params"], measured["grads"], measured["optimizer"])
    assert planned.optimizer < adamw.optimizer


def test_tied_head_counted_once():
    tied = state_bytes(H64LMConfig(**SMALL, tie_word_embeddings=True))
    untied = state_bytes(H64LMConfig(**SMALL, tie_word_embeddings=False))
    assert untied.numel - tied.numel == SMALL["vocab_size"] * SMALL["hidden_size"]


@pytest.mark.parametrize("gpus,ep", [(2, 1), (4, 2), (8, 4), (8, 1), (16, 4)])
def test_fsdp_shards_match_torch_chunk(gpus, ep):
    """FSDP2 gives rank 0 chunk 0 of torch.chunk(param, shards, dim=0) (padded on the last ranks):
    the planner's per-rank count must equal the sum of those chunks, experts split by EP first."""
    config = H64LMConfig(**SMALL, moe_layers="all", num_shared_experts=1)
    expected = 0
    for _, shape, is_expert in parameter_shapes(config):
        rows = shape[0] // ep if is_expert else shape[0]
        shards = gpus // ep if is_expert else gpus
        local = torch.empty((rows,) + shape[1:], device="meta")
        expected += torch.chunk(local, shards, dim=0)[0].numel()
    assert state_bytes(config, gpus, "fsdp", ep).numel == expected


def test_ep_splits_only_expert_tensors():
    config = H64LMConfig(**SMALL, moe_layers="all")
    shapes = list(parameter_shapes(config))
    experts = sum(math.prod(s) for _, s, e in shapes if e)
    assert experts == 3 * config.num_experts * 3 * 32 * 24  # layers x E x (W_gate, W_up, W_down)
    full, split = state_bytes(config, 4, "ddp", 1), state_bytes(config, 4, "ddp", 4)
    assert full.numel - split.numel == experts * 3 // 4


@pytest.mark.parametrize("gpus,strategy,ep", [(3, "ddp", 2), (4, "ddp", 3), (4, "tp", 1)])
def test_impossible_layouts_rejected(gpus, strategy, ep):
    with pytest.raises(ValueError, match="must"):
        state_bytes(H64LMConfig(**SMALL), gpus, strategy, ep)
