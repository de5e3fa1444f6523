"""The MoE layer against independent references: the loss formulas, a naive per-token loop,
and a naive capacity rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from h64lm.model import H64LMConfig
from h64lm.model.moe import MoELayer, router_z_loss, switch_load_balancing_loss
from h64lm.model.moe import experts as experts_module


def _layer(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = H64LMConfig(**{**dict(vocab_size=50, hidden_size=32, num_layers=1, num_attention_heads=4,
                                num_kv_heads=2, intermediate_size=48, moe_intermediate_size=None, num_experts=6,
                                num_experts_per_token=2, moe_layers="all"), **overrides})
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _swiglu(x, w_gate_up, w_down):
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def _naive_moe(layer, x, capacity=None, priority="token"):
    """Each token, one at a time, through each of its top-k experts; an expert serves only its
    first `capacity` assignments, taken in token order ("token") or all first choices in token
    order, then all second choices ("choice")."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = F.linear(tokens, layer.router.weight).softmax(-1)
    top = [probs[n].topk(layer.top_k) for n in range(len(tokens))]
    out = torch.zeros_like(tokens)
    served = [0] * layer.num_experts
    dropped = 0
    slots = [(n, j) for n in range(len(tokens)) for j in range(layer.top_k)]
    if priority == "choice":
        slots.sort(key=lambda s: (s[1], s[0]))
    for n, j in slots:
        p, e = top[n].values[j] / top[n].values.sum(), top[n].indices[j].item()
        if capacity is not None and served[e] >= capacity:
            dropped += 1
            continue
        served[e] += 1
        out[n] += p * _swiglu(tokens[n], layer.experts.gate_up_proj[e],
                              layer.experts.down_proj[e])
    if layer.shared is not None:
        out += layer.shared(tokens)
    return out.view_as(x), dropped


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("shared", [0, 2])
def test_dropless_matches_naive_loop(monkeypatch, grouped, shared):
    if not grouped:
        monkeypatch.setattr(experts_module, "_grouped_mm_supported", lambda x, w: False)
    layer = _layer(num_shared_experts=shared)
    x = torch.randn(3, 7, 32)
    y, stats = layer(x)
    ref, _ = _naive_moe(layer, x)
    assert (y - ref).abs().max().item() <= 1e-5
    assert stats["dropped"].item() == 0.0
    assert stats["load"].sum().item() == pytest.approx(1.0)


def test_grouped_and_loop_paths_have_equal_gradients(monkeypatch):
    x = torch.randn(2, 9, 32)
    grads = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(experts_module, "_grouped_mm_supported", lambda x, w: False)
        layer = _layer()
        y, stats = layer(x)
        (y.square().sum() + stats["aux"]).backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for g_grouped, g_loop in zip(*grads):
        assert torch.allclose(g_grouped, g_loop, atol=1e-5)


@pytest.mark.parametrize("priority", ["token", "choice"])
def test_capacity_drops_overflow_and_counts_it(priority):
    layer = _layer(capacity_factor=0.5, capacity_priority=priority)
    x = torch.randn(2, 10, 32)
    y, stats = layer(x)
    num_assignments = 2 * 10 * layer.top_k
    capacity = math.ceil(0.5 * num_assignments / layer.num_experts)
    ref, dropped = _naive_moe(layer, x, capacity=capacity, priority=priority)
    other, _ = _naive_moe(layer, x, capacity=capacity,
                          priority="choice" if priority == "token" else "token")
    assert (ref - other).abs().max().item() > 1e-3  # the two priorities drop different rows
    assert dropped > 0
    assert stats["dropped"].item() == pytest.approx(dropped / num_assignments)
    assert (y - ref).abs().max().item() <= 1e-5


def _independent_switch_loss(logits, k):
    probs = logits.softmax(-1)
    chosen = probs.topk(k, dim=-1).indices  # [N, k]
    num_tokens, num_experts = logits.shape
    f = torch.zeros(num_experts)
    for row in chosen.tolist():
        for e in row:
            f[e] += 1.0 / (num_tokens * k)
    return num_experts * sum(f[i] * probs[:, i].mean() for i in range(num_experts))


def test_switch_loss_matches_formula():
    logits = torch.randn(40, 6) * 2
    experts = logits.softmax(-1).topk(2, dim=-1).indices
    counts = torch.bincount(experts.flatten(), minlength=6)
    ours = switch_load_balancing_loss(logits.softmax(-1), counts)
    assert ours.item() == pytest.approx(_independent_switch_loss(logits, 2).item(), rel=1e-6)


def test_switch_loss_is_one_when_uniform_and_larger_when_skewed():
    num_experts = 4
    uniform_probs = torch.full((8, num_experts), 1.0 / num_experts)
    even_counts = torch.full((num_experts,), 4)  # 8 tokens x top-2 spread evenly
    assert switch_load_balancing_loss(uniform_probs, even_counts).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    skewed_counts = torch.tensor([8, 8, 0, 0])
    assert switch_load_balancing_loss(skewed_probs, skewed_counts).item() > 1.5


def test_layer_aux_and_z_match_formulas():
    layer = _layer()
    x = torch.randn(2, 11, 32)
    _, stats = layer(x)
    logits = F.linear(x.reshape(-1, 32), layer.router.weight)
    aux_ref = _independent_switch_loss(logits, 2)
    assert stats["aux"].item() == pytest.approx(aux_ref.item(), rel=1e-5)
    z_ref = torch.log(torch.exp(logits).sum(-1)).pow(2).mean()
    assert stats["z"].item() == pytest.approx(z_ref.item(), rel=1e-5)
    assert router_z_loss(logits).item() == pytest.approx(z_ref.item(), rel=1e-5)


def test_model_reports_mean_over_moe_layers(small_model):
    model = small_model(num_layers=4, moe_layers=[0, 3])
    seen = []
    for block in model.layers:
        if block.sparse:
            block.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert [r["layer"] for r in out.router] == [0, 3]
    assert out.aux.item() == pytest.approx(sum(s["aux"].item() for s in seen) / 2, rel=1e-6)
    assert out.ce is not None and not hasattr(out, "loss")  # the objective weighs ce, aux and z


def test_dropless_gather_path_has_the_gradients_of_the_scatter_path():
    """Dropless routing moves rows with permutation gathers (custom backward); a capacity too large
    to drop anything takes the generic index_select / index_copy path: same outputs, same grads."""
    x = torch.randn(2, 9, 32)
    results = []
    for capacity in (None, 100.0):
        layer = _layer(capacity_factor=capacity)
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        assert stats["dropped"].item() == 0
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((y, xi.grad, [p.grad for p in layer.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert torch.allclose(y0, y1, atol=1e-6)
    assert torch.allclose(gx0, gx1, atol=1e-5)
    for a, b in zip(gp0, gp1):
        assert torch.allclose(a, b, atol=1e-5)


def test_permutation_gathers_pass_gradcheck():
    from h64lm.model.moe.permute import gather_tokens, permute_rows

    top_k, n = 2, 5
    assignment = torch.randperm(n * top_k)
    inverse = torch.empty_like(assignment).scatter_(0, assignment, torch.arange(n * top_k))
    tokens = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, assignment // top_k, inverse, top_k),
                                    (tokens,))
    rows = torch.randn(n * top_k, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: permute_rows(r, inverse, assignment), (rows,))
