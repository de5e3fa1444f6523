"""Routing conventions: the top-k renormalisation switch, sigmoid scores, the Switch loss scopes
and its scale against Hugging Face's, evaluation capacity, and the validation of the new keys."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from h64lm.model import H64LMConfig
from h64lm.model.moe import switch_load_balancing_loss
from tests.model.test_moe import _independent_switch_loss, _layer


@pytest.mark.parametrize("k", [1, 2])
def test_default_gates_let_the_lm_loss_train_the_router(small_model, k):
    """CE alone (aux and z coefficients 0) must reach the router at k=1 and k=2; renormalising a
    single gate (p / p = 1) is the convention that would cut it at k=1."""
    def router_grad(**overrides):
        model = small_model(moe_layers="all", num_experts_per_token=k, router_aux_loss_coef=0.0,
                            router_z_loss_coef=0.0, **overrides).train()
        ids = torch.randint(0, 97, (2, 12))
        model(ids, labels=ids.roll(-1, 1)).ce.backward()
        return model.layers[0].ffn.router.weight.grad.abs().max().item()

    assert router_grad() > 1e-5
    if k == 1:  # zero up to rounding: d(p/p)/dp is 0
        assert router_grad(router_norm_topk=True) < 1e-8


def test_default_keeps_mixtral_renormalisation_at_k2_and_switch_weights_at_k1():
    x = torch.randn(20, 32)
    for k, normalised in ((2, True), (1, False)):
        layer = _layer(num_experts_per_token=k)
        routing = layer.router(x)
        p = F.linear(x, layer.router.weight).softmax(-1).topk(k, dim=-1).values
        expected = p / p.sum(-1, keepdim=True) if normalised else p
        assert torch.allclose(routing.weights, expected, atol=1e-6)


def test_sigmoid_scores_select_top_k_and_normalise_the_gates():
    """DeepSeek-V3: s = sigmoid(u), top-k of s, gates s_i / sum of the selected s."""
    layer = _layer(router_score="sigmoid", num_experts_per_token=3)
    x = torch.randn(30, 32)
    routing = layer.router(x)
    s = torch.sigmoid(x @ layer.router.weight.T)
    top = s.topk(3, dim=-1)
    assert torch.equal(routing.experts, top.indices)
    assert torch.allclose(routing.weights, top.values / top.values.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(routing.probs, s / s.sum(-1, keepdim=True), atol=1e-6)


def test_sequence_scope_is_the_mean_of_per_sequence_switch_losses():
    layer = _layer(router_aux_loss_scope="sequence")
    x = torch.randn(3, 10, 32)
    _, stats = layer(x)
    logits = F.linear(x, layer.router.weight)  # [B, T, E]
    ref = sum(_independent_switch_loss(logits[b], 2) for b in range(3)) / 3
    assert stats["aux"].item() == pytest.approx(ref.item(), rel=1e-5)
    whole = _independent_switch_loss(logits.reshape(-1, logits.shape[-1]), 2)
    assert abs(stats["aux"].item() - whole.item()) > 1e-4  # the scope changes the loss


def test_sequence_scope_with_the_selection_bias_counts_the_biased_choices():
    """The definition stated in h64lm/model/moe/losses.py: f_i counts the realised (biased) top-k."""
    layer = _layer(router_aux_loss_scope="sequence", router_bias_update_rate=0.01)
    layer.router.bias[0] = 100.0  # expert 0 is chosen for every token, whatever its score
    x = torch.randn(3, 10, 32)
    _, stats = layer(x)
    probs = F.linear(x, layer.router.weight).softmax(-1)  # [B, T, E], unbiased
    biased = (probs + layer.router.bias).topk(2, dim=-1).indices
    unbiased = probs.topk(2, dim=-1).indices

    def loss(chosen):
        f = F.one_hot(chosen, 6).float().sum(2).mean(1) / 2  # [B, E]: share of each sequence's choices
        return (6 * (f * probs.mean(1)).sum(-1)).mean()

    assert (biased[..., 0] == 0).all()
    assert stats["aux"].item() == pytest.approx(loss(biased).item(), rel=1e-5)
    assert abs(stats["aux"].item() - loss(unbiased).item()) > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_loss_scale_against_hugging_face(k):
    """One layer: HF = k * ours (HF divides counts by N, ours by N*k). Several layers that route
    alike: HF's pooled loss = k * our per-layer mean. So our 0.01 at k=2 is HF's 0.005."""
    logits = torch.randn(50, 6) * 1.5
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(k, dim=-1).indices.flatten(), minlength=6)
    ours = switch_load_balancing_loss(probs, counts)
    hf_one = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
    assert float(hf_one) == pytest.approx(k * ours.item(), rel=1e-5)
    hf_three = load_balancing_loss_func((logits, logits, logits), num_experts=6, top_k=k)
    assert float(hf_three) == pytest.approx(k * ours.item(), rel=1e-5)


@torch.no_grad()
def test_eval_rows_do_not_depend_on_their_batch_with_a_training_capacity(small_model):
    model = small_model(moe_layers="all", capacity_factor=0.5)  # small_model is in eval()
    ids = torch.randint(0, 97, (4, 10))
    alone = model(ids[:1]).logits
    batched = model(ids).logits[:1]
    assert (alone - batched).abs().max().item() <= 1e-5
    model.train()  # the training capacity does drop tokens, and depends on the batch
    assert (model(ids[:1]).logits - model(ids).logits[:1]).abs().max().item() > 1e-4


@torch.no_grad()
def test_eval_capacity_factor_applies_in_eval_mode(small_model):
    model = small_model(moe_layers="all", capacity_factor=None, eval_capacity_factor=0.5)
    ids = torch.randint(0, 97, (4, 10))
    assert all(r["dropped"].item() > 0 for r in model(ids).router)
    assert all(r["dropped"].item() == 0 for r in model.train()(ids).router)


@torch.no_grad()
def test_cached_decoding_equals_full_forward_with_a_training_capacity(small_model):
    model = small_model(moe_layers="all", capacity_factor=0.5)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    steps = [out.logits]
    for t in range(4, 12):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("return_logits", [True, False], ids=["logits", "chunked"])
def test_all_ignored_labels_give_zero_ce_and_zero_gradient(small_model, return_logits):
    model = small_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=torch.full_like(ids, -100), return_logits=return_logits)
    assert out.ce.item() == 0.0
    out.ce.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("override,key", [
    (dict(router_aux_loss_scope="batch"), "model.router_aux_loss_scope"),
    (dict(router_score="relu"), "model.router_score"),
    (dict(capacity_priority="random"), "model.capacity_priority"),
    (dict(router_bias_update_rate=-0.1), "model.router_bias_update_rate"),
    (dict(router_bias_update_rate=float("nan")), "model.router_bias_update_rate"),
    (dict(eval_capacity_factor=0.0), "model.eval_capacity_factor"),
    (dict(eval_capacity_factor=float("inf")), "model.eval_capacity_factor"),
    (dict(router_aux_loss_coef=float("inf")), "model.router_aux_loss_coef"),
    (dict(router_norm_topk="yes"), "model.router_norm_topk"),
])
def test_new_routing_keys_are_validated(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        H64LMConfig(**override)
