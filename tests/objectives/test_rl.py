"""The RL objective against hand computations: rollout rows, GRPO's loss, PPO's value targets,
advantages of equal rewards, the KL of a policy equal to its reference, and learning a toy reward."""

import copy
import math

import pytest
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.objectives.base import StepShare
from h64lm.objectives.rl import PolicyOptimisation, RLSettings
from h64lm.objectives.rollout import Rollout, sample_rollout

CONFIG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
              intermediate_size=48, moe_intermediate_size=24, num_experts=4, max_position_embeddings=64,
              router_aux_loss_coef=0.0, router_z_loss_coef=0.0)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return H64LMForCausalLM(H64LMConfig(**{**CONFIG, **kw})).train()


def _settings(**kw):
    base = dict(algorithm="grpo", group_size=4, max_new_tokens=8, temperature=1.0, clip_eps=0.2, kl_coef=0.1,
                advantage_scale="std", aggregation="sequence", gamma=1.0, lam=0.95, vf_coef=0.1, seed=3,
                eos_id=3)
    return RLSettings(**{**base, **kw})


def _prompts(position=0):
    ids = torch.tensor([[0, 0, 5, 9, 13], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return Batch(ids, torch.full_like(ids, IGNORE_INDEX),
                 extras={"attention_mask": mask, "prompt": torch.tensor([0, 1]),
                         "position": torch.tensor([position, position + 1])})


def _hand_logp(model, batch):
    """log p(label) from the full logits (not the head's fused path), 0 where ignored."""
    logits = model(batch.input_ids, attention_mask=batch.extras["attention_mask"]).logits.float()
    logp = logits.log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp.masked_fill(batch.labels == IGNORE_INDEX, 0.0)


def test_rollout_rows_hold_the_prompt_and_label_exactly_the_completion_through_its_first_eos():
    model, prompts = _model(), _prompts()
    free = sample_rollout(model, prompts, 4, 8, 1.0, eos_id=-1, seed=3, fixed_length=True)  # no EOS
    eos = int(free.completions[0, 2])  # a token row 0 samples third: its EOS in the run below
    L = prompts.input_ids.shape[1]
    runs = [sample_rollout(model, prompts, 4, 8, 1.0, eos_id=eos, seed=3, fixed_length=f) for f in (False, True)]
    for r in runs:
        assert r.batch.input_ids.shape == r.batch.labels.shape == r.batch.extras["attention_mask"].shape
        for row in range(8):
            sampled = free.completions[row].tolist()
            through_eos = sampled[:sampled.index(eos) + 1] if eos in sampled else sampled
            labels = r.batch.labels[row]
            assert labels[:L - 1].eq(IGNORE_INDEX).all()  # the prompt and its padding: no target
            assert [t for t in labels.tolist() if t != IGNORE_INDEX] == through_eos
            assert labels[L - 1:L - 1 + len(through_eos)].tolist() == through_eos  # contiguous from L-1
            assert torch.equal(r.batch.input_ids[row, :L], prompts.input_ids[row // 4])
            assert torch.equal(r.batch.extras["attention_mask"][row, :L], prompts.extras["attention_mask"][row // 4])
            # real inputs: the prompt's unpadded tokens, then the completion through its EOS as far
            # as the input columns reach (the last sampled token is no input)
            inputs = r.batch.input_ids.shape[1] - L
            assert int(r.batch.real_tokens[row]) == \
                int(prompts.extras["attention_mask"][row // 4].sum()) + min(len(through_eos), inputs)
        assert r.mask[0].sum() == 3
    # sharded layouts decode every step: the same rollout
    assert torch.equal(runs[0].batch.input_ids, runs[1].batch.input_ids)
    assert torch.equal(runs[0].batch.labels, runs[1].batch.labels)
    # the sampling stream follows the prompts' position, not the process
    again = sample_rollout(model, prompts, 4, 8, 1.0, eos_id=eos, seed=3)
    other = sample_rollout(model, _prompts(position=2), 4, 8, 1.0, eos_id=eos, seed=3)
    assert torch.equal(again.completions, runs[0].completions)
    assert not torch.equal(other.completions, runs[0].completions)


def _objective(model, reference, reward, **kw):
    return PolicyOptimisation(_settings(**kw), model.config, reference, reward)


def test_equal_rewards_give_zero_advantages_and_the_first_step_has_zero_kl():
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)
    objective = _objective(model, reference, lambda rollout, prompts: torch.ones(rollout.completions.shape[0]))
    (batch,) = objective.prepare_step(model, [_prompts()])
    assert torch.equal(batch.extras["advantages"], torch.zeros(8))
    assert batch.real_tokens is not None  # the trainer's token count survives scoring
    out = objective(model, batch, StepShare(batch.num_targets(), batch.num_targets(), 1, 1))
    assert out.terms["kl"] == 0.0  # policy == reference: k3 is exactly 0
    assert out.terms["pg_loss"] == 0.0 and out.terms["reward/mean"] == 1.0 and out.terms["reward/std"] == 0.0


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_and_gradient_equal_a_hand_computation(aggregation):
    model = _model()
    reference = _model(seed=1).requires_grad_(False)  # another policy: the KL term is not 0
    torch.manual_seed(5)
    ids = torch.randint(4, 64, (4, 7))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:] = torch.randint(4, 64, (4, 4))
    labels[1, 5:] = IGNORE_INDEX  # a completion that ended early
    batch = Batch(ids, labels, extras={"attention_mask": torch.ones_like(ids),
                                       "rewards": torch.tensor([1.0, 0.0, 0.5, 0.0]),
                                       "advantages": torch.tensor([1.5, -0.5, 0.25, -1.25]),
                                       "ref_logp": _hand_logp(reference, Batch(ids, labels, extras={
                                           "attention_mask": torch.ones_like(ids)})).detach()})
    beta = 0.1
    objective = _objective(model, reference, None, group_size=2, kl_coef=beta, aggregation=aggregation)
    n = batch.num_targets()
    # half of a step of 2 micro-batches on 1 rank, the other half holding as many tokens
    loss = objective(model, batch, StepShare(n, 2 * n, 2, 1)).loss
    loss.backward()
    stage_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    logp = _hand_logp(model, batch)
    mask = (labels != IGNORE_INDEX).float()
    d = batch.extras["ref_logp"] - logp
    # ratio exp(logp - logp.detach()) = 1 in value, its gradient that of logp
    ratio = torch.exp(logp - logp.detach())
    per_token = -ratio * batch.extras["advantages"][:, None] + beta * (torch.exp(d) - d - 1)
    if aggregation == "sequence":
        hand = ((per_token * mask).sum(1) / mask.sum(1)).mean() / 2
    else:
        hand = (per_token * mask).sum() / (2 * n)  # the step's mean over its 2n tokens
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(stage_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_ppo_value_targets_are_gae_of_terminal_reward_minus_kl_penalty():
    model = _model(score_head=True)
    reference = _model(seed=1, score_head=True).requires_grad_(False)
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2:] = torch.tensor(ids[0, 3:].tolist() + [3])  # 4 actions, the last the EOS
    labels[1, 2:4] = torch.tensor([9, 3])  # 2 actions
    batch = Batch(ids, labels, extras={"attention_mask": torch.ones_like(ids)})
    rewards = torch.tensor([1.0, -0.5])
    gamma, lam, beta = 0.9, 0.8, 0.2
    objective = _objective(model, reference, None, algorithm="ppo", group_size=1, gamma=gamma, lam=lam,
                           kl_coef=beta)
    x = objective._scored(model, Rollout(batch, ids, torch.ones_like(ids), ids, ids > 0, torch.zeros(2)),
                          rewards).extras

    with torch.no_grad():
        values = model(ids, attention_mask=torch.ones_like(ids)).scores
        logp, ref = _hand_logp(model, batch), _hand_logp(reference, batch)
    for row in range(2):
        steps = [t for t in range(6) if labels[row, t] != IGNORE_INDEX]
        adv, next_v, next_a = {}, 0.0, 0.0
        for t in reversed(steps):  # A_t = r_t + gamma V_{t+1} - V_t + gamma lam A_{t+1}
            r = -beta * (logp[row, t] - ref[row, t]).item() + (rewards[row].item() if t == steps[-1] else 0.0)
            adv[t] = r + gamma * next_v - values[row, t].item() + gamma * lam * next_a
            next_v, next_a = values[row, t].item(), adv[t]
        for t in range(6):
            want = adv.get(t, 0.0)
            assert x["advantages"][row, t].item() == pytest.approx(want, abs=1e-5)
            target = want + values[row, t].item() if t in adv else 0.0
            assert x["returns"][row, t].item() == pytest.approx(target, abs=1e-5)
    torch.testing.assert_close(x["old_values"], values)


def test_grpo_learns_a_toy_reward_in_a_few_dozen_steps():
    """reward = 1 when the first sampled token is even: about half at the start, learnt quickly."""
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)

    def first_token_even(rollout, prompts):
        return (rollout.completions[:, 0] % 2 == 0).float()

    objective = _objective(model, reference, first_token_even, group_size=8, max_new_tokens=2, kl_coef=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    means = []
    for step in range(30):
        batches = objective.prepare_step(model, [_prompts(position=2 * step)])
        n = sum(b.num_targets() for b in batches)
        for b in batches:
            out = objective(model, b, StepShare(b.num_targets(), n, 1, 1))
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        means.append(out.terms["reward/mean"].item())
    start, end = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert end > 0.9 and end > start + 0.2, means


# --------------------------------------------------------------------------- truncated sampling
def _full_logits(model, batch):
    """[R, S, V] logits of whole rollout rows (no cache), eval mode as the generator runs."""
    model.eval()
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.extras["attention_mask"]).logits
    model.train()
    return logits.float()


def _nucleus(probs, p):
    """The naive top-p set: the most likely tokens, one at a time, until their mass reaches p."""
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        kept.add(token)
        mass += probs[token]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (5, 0.6)])
def test_rollout_tokens_lie_inside_the_top_k_and_top_p_sets(top_k, top_p):
    """Every sampled token is among the k largest logits and inside the nucleus of mass p of the
    temperature-scaled distribution at its position, checked against full forwards; sampling
    without the cut leaves those sets, so the check can fail."""
    model, temperature = _model(), 1.3
    kw = dict(eos_id=-1, seed=3, fixed_length=True)  # no EOS: every column is a sampled token
    cut = sample_rollout(model, _prompts(), 8, 8, temperature, top_k=top_k, top_p=top_p, **kw)
    free = sample_rollout(model, _prompts(), 8, 8, temperature, **kw)

    def outside(rollout):
        logits = _full_logits(model, rollout.batch) / temperature
        count = 0
        for row, pos in (rollout.batch.labels != IGNORE_INDEX).nonzero().tolist():
            token, row_logits = int(rollout.batch.labels[row, pos]), logits[row, pos]
            allowed = set(range(row_logits.numel()))
            if top_k:
                allowed &= set(row_logits.topk(top_k).indices.tolist())
            if top_p < 1:  # top-p after top-k: the nucleus of the renormalised k candidates
                probs = row_logits.masked_fill(~torch.isin(torch.arange(row_logits.numel()),
                                                           torch.tensor(sorted(allowed))), float("-inf"))
                allowed &= _nucleus(probs.softmax(-1).tolist(), top_p)
            count += token not in allowed
        return count

    assert cut.mask.sum() == 16 * 8
    assert outside(cut) == 0
    assert outside(free) > 10
    # the stream is still the prompts' position's: the same tokens again
    assert torch.equal(sample_rollout(model, _prompts(), 8, 8, temperature, top_k=top_k, top_p=top_p,
                                      **kw).completions, cut.completions)


def test_the_ratio_reads_the_policys_full_distribution_under_top_k():
    """top_k=1 samples the argmax with probability 1 under the truncated distribution (log-prob 0);
    the old log-probs of PPO's ratio are the policy's own over the whole vocabulary instead."""
    model = _model(score_head=True)
    reference = copy.deepcopy(model).requires_grad_(False)
    objective = _objective(model, reference, lambda rollout, prompts: torch.ones(rollout.completions.shape[0]),
                           algorithm="ppo", top_k=1)
    (batch,) = objective.prepare_step(model, [_prompts()])
    mask = batch.labels != IGNORE_INDEX
    with torch.no_grad():
        full = _hand_logp(model, batch)
    torch.testing.assert_close(batch.extras["old_logp"], full, rtol=1e-4, atol=1e-5)
    assert (batch.extras["old_logp"][mask] < -0.1).all()
    greedy = _full_logits(model, batch).argmax(-1)
    assert torch.equal(batch.labels[mask], greedy[mask])  # and top_k=1 did sample the argmax


# --------------------------------------------------------------------------- PPO whitening
def test_whitening_uses_the_mean_and_std_of_every_counted_token_of_the_step():
    from h64lm.objectives.policy import whiten

    a = [torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]]), torch.tensor([[-3.0, 5.0, 7.0]])]
    m = [torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(), torch.tensor([[1, 1, 1]]).bool()]
    counted = [1.0, 2.0, 4.0, -3.0, 5.0, 7.0]  # 9 and the zeros are masked out
    mean = sum(counted) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in counted) / 6)  # population std
    out = whiten(a, m)
    want = [[[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]],
            [[(-3 - mean) / std, (5 - mean) / std, (7 - mean) / std]]]
    for got, w in zip(out, want):
        torch.testing.assert_close(got, torch.tensor(w), rtol=1e-6, atol=1e-6)
    values = torch.cat([o[x] for o, x in zip(out, m)])
    assert values.mean().abs() < 1e-6 and values.var(unbiased=False).sub(1).abs() < 1e-6
    # another rank's tokens enter the statistics through the all-reduce hook: here a rank holding
    # the same micro-batches again leaves them unchanged (twice the sums, the same mean and std)
    doubled = whiten(a, m, sum_over_ranks=lambda t: t * 2)
    for x, y in zip(doubled, out):
        torch.testing.assert_close(x, y)
    shifted = whiten(a, m, sum_over_ranks=lambda t: t + torch.tensor([6.0, 60.0]) if t.numel() == 2 else t)
    assert not torch.allclose(shifted[0], out[0])  # a rank with other tokens moves the mean


def test_ppo_whitens_the_advantages_of_the_whole_step_and_keeps_the_value_targets():
    model = _model(score_head=True)
    reference = _model(seed=1, score_head=True).requires_grad_(False)

    def reward(rollout, prompts):
        return torch.arange(rollout.completions.shape[0], dtype=torch.float32)

    prompts = [_prompts(0), _prompts(2)]  # two micro-batches of the step
    raw = _objective(model, reference, reward, algorithm="ppo").prepare_step(model, prompts)
    white = _objective(model, reference, reward, algorithm="ppo", whiten_advantages=True).prepare_step(model, prompts)
    masks = [b.labels != IGNORE_INDEX for b in raw]
    values = torch.cat([b.extras["advantages"][x] for b, x in zip(raw, masks)]).double()
    mean, std = values.mean(), values.std(unbiased=False)
    for r, w, x in zip(raw, white, masks):
        want = torch.where(x, (r.extras["advantages"] - mean) / std, 0.0).float()
        torch.testing.assert_close(w.extras["advantages"], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(w.extras["returns"], r.extras["returns"])  # targets from the raw advantages
    with pytest.raises(ValueError, match="PPO's"):
        _settings(whiten_advantages=True)  # GRPO
