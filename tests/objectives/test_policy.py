"""GRPO/PPO math against hand loops and hand computations."""

import math
import statistics

import pytest
import torch

from h64lm.objectives.policy import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    k3_kl,
    terminal_rewards,
)


def test_group_advantages_match_a_hand_loop():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.0, 3.0, 0.0]
    G, eps = 4, 1e-4
    expected = []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        mean, std = statistics.mean(group), statistics.stdev(group)  # sample std
        expected += [(r - mean) / (std + eps) for r in group]
    got = group_advantages(torch.tensor(rewards), G)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[4:8].tolist() == [0.0] * 4  # an all-equal group carries no signal
    no_std = group_advantages(torch.tensor(rewards), G, scale="none")
    assert no_std[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_group_advantages_refuse_bad_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(torch.zeros(6), 1)


def test_k3_is_zero_at_equality_and_matches_its_formula():
    logp = torch.tensor([[-1.0, -2.0, -0.1]])
    assert k3_kl(logp, logp).tolist() == [[0.0, 0.0, 0.0]]
    ref = torch.tensor([[-1.5, -1.0, -0.1]])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp[0].tolist(), ref[0].tolist())]
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx(expected)
    assert all(v >= 0 for v in expected)


def _hand_policy_loss(logp, old, adv, mask, eps, beta, ref, aggregation):
    rows = []
    for b in range(len(logp)):
        terms = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            rho = math.exp(logp[b][t] - old[b][t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            d = ref[b][t] - logp[b][t]
            terms.append(-min(rho * adv[b], clipped * adv[b]) + beta * (math.exp(d) - d - 1))
        rows.append(terms)
    if aggregation == "sequence":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_clipped_policy_loss_by_hand(aggregation):
    old = [[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]
    # ratios: row 0 exp(0.5)=1.65 (clipped, A>0), exp(-0.1)=0.90, exp(0)=1 (masked);
    #         row 1 exp(-0.5)=0.61 (clipped, A<0), exp(0.1)=1.105, exp(-1) (masked)
    logp = [[-0.5, -1.1, -1.0], [-2.5, -1.9, -3.0]]
    ref = [[-0.7, -1.0, -5.0], [-2.0, -2.0, -5.0]]
    mask = [[True, True, False], [True, True, False]]
    adv, eps, beta = [1.0, -2.0], 0.2, 0.05
    loss, m = clipped_policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv),
                                  torch.tensor(mask), clip_eps=eps, ref_logp=torch.tensor(ref),
                                  kl_beta=beta, aggregation=aggregation)
    assert loss.item() == pytest.approx(
        _hand_policy_loss(logp, old, adv, mask, eps, beta, ref, aggregation), rel=1e-6)
    assert m["clip_ratio"] == pytest.approx(2 / 4)
    kls = [math.exp(ref[b][t] - logp[b][t]) - (ref[b][t] - logp[b][t]) - 1
           for b in range(2) for t in range(2)]
    assert m["kl"] == pytest.approx(sum(kls) / 4, rel=1e-6)


def test_clip_is_asymmetric_with_clip_eps_high():
    logp, old = torch.tensor([[0.24]]), torch.tensor([[0.0]])  # ratio 1.271
    mask = torch.ones(1, 1, dtype=torch.bool)
    _, tight = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    loss, loose = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2,
                                      clip_eps_high=0.28)
    assert (tight["clip_ratio"], loose["clip_ratio"]) == (1.0, 0.0)
    assert loss.item() == pytest.approx(-math.exp(0.24))


def test_gradient_is_zero_where_clipped():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]),
                                  torch.ones(1, 2, dtype=torch.bool), aggregation="token")
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])  # d(-rho/2)/dlogp = -rho/2 = -0.5


def _naive_gae(rewards, values, mask, gamma, lam):
    """Per row: keep the counted tokens, run the textbook reverse recursion, scatter back."""
    adv_out, ret_out = [], []
    for r, v, m in zip(rewards, values, mask):
        idx = [t for t in range(len(m)) if m[t]]
        a = [0.0] * len(m)
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v[idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = r[t] + gamma * next_v - v[t]
            running = delta + gamma * lam * running
            a[t] = running
        adv_out.append(a)
        ret_out.append([a[t] + v[t] if m[t] else 0.0 for t in range(len(m))])
    return adv_out, ret_out


def test_gae_matches_a_naive_reverse_loop():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]).bool()
    values = torch.randn(3, 6)
    rewards = terminal_rewards(torch.tensor([1.0, -0.5, 3.0]), mask) + 0.1 * torch.randn(3, 6) * mask
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = _naive_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert adv.tolist() == [pytest.approx(row, abs=1e-5) for row in exp_adv]
    assert ret.tolist() == [pytest.approx(row, abs=1e-5) for row in exp_ret]


def test_terminal_rewards_sit_on_the_last_counted_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]]).bool()
    out = terminal_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert out.tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    mask = torch.ones(1, 3, dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [pytest.approx([0.8, 0.6, 0.4])]
    assert ret.tolist() == [pytest.approx([1.0, 1.0, 1.0])]


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 9.0]])
    old = torch.tensor([[0.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    # token 0: unclipped (1-2)^2=1, clipped V=0.7: (0.7-2)^2=1.69 -> max 1.69
    # token 1: unclipped 0, clipped V=0.0 (within 0.2 of 0.1): 0 -> 0
    loss = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2)


def test_completion_mask_keeps_the_first_eos_and_drops_what_follows():
    from h64lm.objectives.policy import completion_mask

    eos = 2
    completions = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 0]])
    assert completion_mask(completions, eos).tolist() == [
        [True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert completion_mask(completions, None).all()


def test_first_grpo_step_on_sampled_completions():
    """generate -> completion mask -> label log-probs -> GRPO loss, policy == reference == old:
    ratio 1, k3 0, nothing clipped, and the loss is -mean(A) = 0 (advantages sum to 0 per group)
    while its gradient is not zero."""
    from h64lm.model import H64LMConfig, H64LMForCausalLM, left_pad
    from h64lm.objectives.logprobs import token_logprobs
    from h64lm.objectives.policy import completion_mask

    torch.manual_seed(0)
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64, hidden_size=32, num_layers=2,
                                         num_attention_heads=4, num_kv_heads=2,
                                         intermediate_size=48, moe_intermediate_size=24,
                                         num_experts=4, max_position_embeddings=64))
    ids, mask = left_pad([[5, 9, 13], [7]])
    G, n, eos = 4, 6, 3
    tokens = model.generate(ids, n, attention_mask=mask, num_return_sequences=G, eos_token_id=eos,
                            generator=torch.Generator().manual_seed(1))
    T = ids.shape[1]
    keep = completion_mask(tokens[:, T:], eos)  # [B*G, n']
    full_mask = torch.cat((mask.repeat_interleave(G, 0), keep.long()), dim=1)
    labels = torch.full_like(tokens, -100)
    labels[:, T - 1:-1] = tokens[:, T:].masked_fill(~keep, -100)  # position t predicts t + 1
    model.train()
    logp = token_logprobs(model(tokens, attention_mask=full_mask).logits, labels)[:, T - 1:-1]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0])
    loss, m = clipped_policy_loss(logp, logp.detach(), group_advantages(rewards, G), keep,
                                  ref_logp=logp.detach(), kl_beta=0.04)
    assert m["kl"] == 0.0 and m["clip_ratio"] == 0.0
    assert abs(loss.item()) < 1e-5
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
