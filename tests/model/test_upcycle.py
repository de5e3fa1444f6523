"""Sparse upcycling: at step 0 the upcycled MoE model computes the dense model's loss."""

import pytest
import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.model.upcycle import upcycle_state_dict
from tests.model.conftest import SMALL

DENSE = {**SMALL, "moe_layers": "none", "moe_intermediate_size": None}


def _ce(cfg, state, ids):
    model = H64LMForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(ids, labels=ids.roll(-1, 1)).ce.item()


@pytest.mark.parametrize("moe", [
    dict(moe_layers="all", num_experts=4, num_experts_per_token=2),
    dict(moe_layers="alternate", num_experts=8, num_experts_per_token=3, num_shared_experts=2),
    dict(moe_layers=[0], num_experts=4, num_experts_per_token=1, router_norm_topk=True,
         router_score="sigmoid", router_bias_update_rate=0.01),
])
def test_upcycled_model_has_the_dense_loss_at_step_zero(moe):
    torch.manual_seed(0)
    dense_cfg = H64LMConfig(**DENSE)
    dense = H64LMForCausalLM(dense_cfg)
    moe_cfg = H64LMConfig(**{**DENSE, **moe})
    ids = torch.randint(0, 97, (3, 16))
    ref = _ce(dense_cfg, dense.state_dict(), ids)
    state = upcycle_state_dict(dense.state_dict(), dense_cfg, moe_cfg)
    assert _ce(moe_cfg, state, ids) == pytest.approx(ref, abs=1e-5)
    noisy = upcycle_state_dict(dense.state_dict(), dense_cfg, moe_cfg, noise_std=0.05)
    assert abs(_ce(moe_cfg, noisy, ids) - ref) > 1e-4  # the check can see a difference


@pytest.mark.parametrize("dense_over,moe_over,key", [
    ({}, dict(moe_layers="all", moe_intermediate_size=48), "model.moe_intermediate_size"),
    ({}, dict(moe_layers="all", hidden_size=32), "model.hidden_size"),
    (dict(moe_layers="alternate"), dict(moe_layers="all"), "model.moe_layers"),
])
def test_unsupported_upcycling_fails_in_one_line(dense_over, moe_over, key):
    dense_cfg = H64LMConfig(**{**DENSE, **dense_over})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        upcycle_state_dict(H64LMForCausalLM(dense_cfg).state_dict(), dense_cfg,
                           H64LMConfig(**{**DENSE, **moe_over}))
    assert "\n" not in str(err.value)
