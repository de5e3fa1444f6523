"""Global-batch load balancing and aux-loss-free router biases.

References: the Switch loss of the whole global batch computed in one forward (micro_batch scope
on the concatenated batch), and the same step split over 1, 2 and 4 gloo processes."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from h64lm.objectives.balancing import accumulate_counts, prepare_global_balance, update_router_bias
from h64lm.objectives.lm import lm_loss
from tests.model.conftest import build

GLOBAL = dict(moe_layers="all", router_aux_loss_scope="global", router_aux_loss_coef=0.5)


def _global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 2, 9), generator=g)  # 4 micro-batches of [2, 9]
    return [(m[:, :-1], m[:, 1:]) for m in ids]


def _step(model, micro, group=None):
    """Counting pass, then forward/backward over this rank's micro-batches -> mean loss."""
    prepare_global_balance(model, [x for x, _ in micro], group)
    total = 0.0
    for x, y in micro:
        loss = lm_loss(model(x, labels=y), model.config) / len(micro)
        loss.backward()
        total += loss.item()
    return total


def test_global_scope_over_micro_batches_equals_one_forward_of_the_global_batch():
    model = build(**GLOBAL).train()
    micro = _global_batch()
    loss = _step(model, micro)
    ref_model = build(**{**GLOBAL, "router_aux_loss_scope": "micro_batch"}).train()
    x, y = (torch.cat(t) for t in zip(*micro))
    ref = ref_model(x, labels=y)
    ref_loss = lm_loss(ref, ref_model.config)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # the micro-batch scope on the same micro-batches is a different loss
    other = build(**{**GLOBAL, "router_aux_loss_scope": "micro_batch"}).train()
    assert sum(other(x, labels=y).aux.item() for x, y in micro) / 4 != pytest.approx(
        ref.aux.item(), rel=1e-4)


def test_counting_pass_routes_as_the_training_forwards_with_dropout():
    model = build(**GLOBAL, dropout=0.2).train()
    micro = _global_batch()
    counted = prepare_global_balance(model, [x for x, _ in micro])
    seen = {}
    for x, y in micro:
        accumulate_counts(seen, model(x, labels=y).router)
    assert counted.keys() == seen.keys()
    for i in seen:
        assert torch.equal(counted[i], seen[i])


def test_global_scope_without_prepared_counts_fails_clearly():
    model = build(**GLOBAL).train()
    with pytest.raises(RuntimeError, match="prepare_global_balance"):
        model(torch.randint(0, 97, (1, 5)))


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build(**GLOBAL).train()
    accum = 4 // world
    loss = torch.tensor(_step(model, _global_batch()[rank * accum:(rank + 1) * accum]))
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for t in (loss, grads):  # what DDP does with gradients: the mean over ranks
        dist.all_reduce(t)
        t /= world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_scope_is_the_same_for_1x4_2x2_and_4x1_layouts(tmp_path):
    results = []
    for world in (1, 2, 4):
        out = tmp_path / f"{world}.pt"
        mp.spawn(_worker, args=(world, str(tmp_path / f"init{world}"), str(out)), nprocs=world)
        results.append(torch.load(out, weights_only=True))
    for other in results[1:]:
        assert abs(other["loss"] - results[0]["loss"]).item() <= 1e-5
        assert (other["grads"] - results[0]["grads"]).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_bias_updates_balance_a_router_that_prefers_one_expert(score):
    """Router rows: expert 0 gets logit 3 on every token (least squares on the layer's inputs),
    the others random. With bias updates only (no aux loss, no training), max/mean load falls
    below 1.5 within 300 steps; gate weights stay the renormalised unbiased scores."""
    model = build(num_layers=1, moe_layers="all", num_experts=8, router_score=score,
                  router_bias_update_rate=0.01, router_aux_loss_coef=0.0).train()
    ids = torch.randint(0, 97, (4, 16))  # 64 tokens = hidden size: the fit below is exact
    router = model.layers[0].ffn.router
    inputs = []
    router.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    model(ids)
    h = inputs[0]  # [N, hidden], the router's input (the bias does not change it)
    router.weight[1:] = torch.randn(7, h.shape[1]) / h.norm(dim=1).mean()
    router.weight[0] = torch.linalg.lstsq(h, torch.full((h.shape[0], 1), 3.0)).solution[:, 0]

    def load():  # the router alone: the rest of the layer does not affect the counts
        routing = router(h)
        counts = torch.bincount(routing.experts.flatten(), minlength=8).float()
        return (counts.max() / counts.mean()).item(), counts, routing

    assert torch.equal(load()[1], model(ids).router[0]["counts"].float())
    assert load()[0] > 3.5  # nearly every token's first choice is expert 0
    history = []
    for _ in range(300):
        ratio, counts, routing = load()
        history.append(ratio)
        update_router_bias(model, {0: counts})
    assert max(history[-20:]) < 1.5, history[-20:]

    s = h @ router.weight.T
    s = s.softmax(-1) if score == "softmax" else s.sigmoid()
    chosen = s.gather(1, routing.experts)
    assert torch.allclose(routing.weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6)
    assert not torch.equal(routing.experts.sort(-1).values, s.topk(2).indices.sort(-1).values)
    assert "layers.0.ffn.router.bias" in model.state_dict()
    assert all(n != "layers.0.ffn.router.bias" for n, _ in model.named_parameters())


def test_bias_moves_only_when_the_optimizer_steps_and_a_nan_bias_is_counted():
    """The post-step hook: a step moves b by rate * sign(mean - c); a skipped step (no
    optimizer.step()) moves nothing; a NaN bias shows in `nonfinite()` (divergence signal)."""
    from h64lm.objectives.balancing import RouterBiasUpdate

    model = build(num_layers=1, moe_layers="all", num_experts=4, router_bias_update_rate=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    bias = model.layers[0].ffn.router.bias
    hook = RouterBiasUpdate(model, optimizer)
    hook.set_loads({0: torch.tensor([0.4, 0.3, 0.2, 0.1])})  # mean 0.25
    assert torch.equal(bias, torch.zeros(4))  # nothing before the step
    optimizer.step()
    assert torch.equal(bias, torch.tensor([-0.25, -0.25, 0.25, 0.25]))
    hook.set_loads({0: torch.tensor([0.4, 0.3, 0.2, 0.1])})  # this step is skipped: no optimizer.step()
    hook.set_loads({0: torch.tensor([0.1, 0.1, 0.1, 0.7])})  # the next step's loads replace them
    optimizer.step()
    assert torch.equal(bias, torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert hook.nonfinite().item() == 0
    with torch.no_grad():
        bias[1] = float("nan")
    assert hook.nonfinite().item() == 1


def test_bias_rate_above_one_is_a_config_error():
    from h64lm.model import H64LMConfig
    from h64lm.validation import ConfigError

    with pytest.raises(ConfigError, match="model.router_bias_update_rate"):
        H64LMConfig(router_bias_update_rate=1e30)
