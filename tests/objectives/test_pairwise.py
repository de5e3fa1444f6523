"""The preference objectives on fixed model outputs: which position and tokens they read, the
step's pair mean over micro-batches, and the router terms, against hand computations."""

import math
from types import SimpleNamespace

import pytest
import torch

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.model.config import H64LMConfig
from h64lm.objectives.base import StepShare
from h64lm.objectives.pairwise import DirectPreference, RewardModelling

CONFIG = H64LMConfig(vocab_size=16, hidden_size=8, num_layers=2, num_attention_heads=2, num_kv_heads=1,
                     intermediate_size=16, moe_intermediate_size=8, num_experts=4, router_aux_loss_coef=0.5,
                     router_z_loss_coef=0.0)


class FixedModel:
    """Returns given per-token log-probs / scores for the rows it is called with (by first token)."""

    def __init__(self, logprobs=None, scores=None, aux=0.0):
        self.logprobs, self.scores, self.aux = logprobs, scores, aux

    def __call__(self, input_ids, labels=None, return_logits=True, token_logprobs=False):
        rows = input_ids[:, 0]
        out = SimpleNamespace(aux=torch.tensor(self.aux), z=torch.tensor(0.0), router=[])
        if token_logprobs:
            out.token_logprobs = self.logprobs[rows] * (labels != IGNORE_INDEX)
        if self.scores is not None:
            out.scores = self.scores[rows]
        return out


def _batch(rows, answer_from=2, T=5, last=None):
    """Rows whose first token is their id in the fixed model; labels on positions >= answer_from."""
    ids = torch.tensor(rows)[:, None].repeat(1, T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, answer_from:] = 1
    last = torch.full((len(rows),), T - 1) if last is None else torch.tensor(last)
    return Batch(ids, labels, extras={"pair": torch.tensor(rows) // 2, "last": last})


def test_reward_model_reads_the_last_real_token_and_adds_the_router_terms():
    scores = torch.tensor([[0.0, 9.0, 2.0, 9.0], [0.0, 9.0, -1.0, 9.0]])  # rows 0 (chosen), 1 (rejected)
    model = FixedModel(scores=scores, aux=0.2)
    batch = Batch(torch.tensor([[0, 5, 5, 5], [1, 5, 5, 5]]), torch.zeros(2, 4, dtype=torch.long),
                  extras={"last": torch.tensor([2, 2])})
    out = RewardModelling(CONFIG)(model, batch, StepShare(1, 2, micro_batches=2, world_size=1))
    bt = -math.log(1 / (1 + math.exp(-3.0)))  # r_c - r_r = 2 - (-1), read at position 2, not 3
    assert out.terms["pair_loss"].item() == pytest.approx(bt / 2)
    assert out.loss.item() == pytest.approx((bt + 0.5 * 0.2) / 2)
    assert out.terms["rewards/margins"].item() == pytest.approx(3.0 / 2)
    assert out.terms["rewards/accuracies"].item() == pytest.approx(1.0 / 2)


def test_dpo_step_is_the_mean_over_all_pairs_of_its_micro_batches():
    """Two micro-batches of one pair each: the sum of their losses is the pair mean of the whole
    step, whatever the answers' lengths."""
    torch.manual_seed(0)
    policy = -torch.rand(4, 5)  # [rows, T] token log-probs; rows 0/1 = pair 0, rows 2/3 = pair 1
    ref = -torch.rand(4, 5)
    reference = FixedModel(ref)

    def reference_logps(batch):
        out = reference(batch.input_ids, batch.labels, token_logprobs=True)
        total = out.token_logprobs.sum(-1)
        return torch.stack([total[0::2], total[1::2]], 1)

    objective = DirectPreference(CONFIG, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
                                 reference=reference_logps)
    batches = [_batch([0, 1], answer_from=2), _batch([2, 3], answer_from=4)]
    share = StepShare(0, 0, micro_batches=2, world_size=1)
    total = sum(objective(FixedModel(policy), b, share).terms["pair_loss"] for b in batches)
    expected = []
    for pair, start in ((0, 2), (1, 4)):  # by hand
        c, r = 2 * pair, 2 * pair + 1
        h = (policy[c, start:].sum() - ref[c, start:].sum()) - (policy[r, start:].sum() - ref[r, start:].sum())
        expected.append(-math.log(1 / (1 + math.exp(-0.5 * h.item()))))
    assert total.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_ipo_reads_per_token_means():
    policy = torch.zeros(2, 5)
    policy[0, 2:] = -1.0  # chosen: 3 answer tokens at -1 each -> mean -1
    policy[1, 2:] = -2.0
    objective = DirectPreference(CONFIG, beta=0.25, loss_type="ipo", label_smoothing=0.0,
                                 reference=lambda b: torch.zeros(1, 2))
    out = objective(FixedModel(policy), _batch([0, 1]), StepShare(0, 0, 1, 1))
    assert out.terms["pair_loss"].item() == pytest.approx((1.0 - 1 / (2 * 0.25)) ** 2)  # h = -1 - (-2) = 1


# --------------------------------------------------------------------------- RPO: DPO + NLL
def _rows(rows, starts, T=6):
    """Rows whose first token is their id in the fixed model, labelled from starts[i] on."""
    ids = torch.tensor(rows)[:, None].repeat(1, T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, start in enumerate(starts):
        labels[i, start:] = 1
    return Batch(ids, labels, extras={"pair": torch.tensor(rows) // 2, "last": torch.full((len(rows),), T - 1)})


STARTS = {0: 1, 1: 3, 2: 4, 3: 2}  # answer start of each row: chosen answers of 5 and 2 tokens


def _rpo(alpha, ref, beta=0.5, loss_type="sigmoid"):
    def reference(batch):
        total = ref[batch.input_ids[:, 0]] * (batch.labels != IGNORE_INDEX)
        return torch.stack([total.sum(-1)[0::2], total.sum(-1)[1::2]], 1)

    return DirectPreference(CONFIG, beta=beta, loss_type=loss_type, label_smoothing=0.0, reference=reference,
                            rpo_alpha=alpha)


def _step(objective, policy, split):
    """One optimizer step over pairs {0, 1} as 1 micro-batch or 2 -> (sum of losses, nll_loss, dL/dpolicy)."""
    policy = policy.clone().requires_grad_(True)
    rows = [[0, 1, 2, 3]] if split == 1 else [[0, 1], [2, 3]]
    batches = [_rows(r, [STARTS[i] for i in r]) for r in rows]
    objective.prepare_step(None, batches)
    outs = [objective(FixedModel(policy), b, StepShare(0, 0, micro_batches=len(batches), world_size=1))
            for b in batches]
    loss = sum(o.loss for o in outs)
    loss.backward()
    return loss.detach(), sum(o.terms.get("nll_loss", torch.tensor(math.nan)) for o in outs), policy.grad


def _hand_rpo(policy, ref, alpha, beta=0.5):
    """-log sigma(beta h) mean over the 2 pairs + alpha x (- sum of chosen token log-probs / their count)."""
    def answer(t, row):
        return t[row, STARTS[row]:].sum()

    dpo = 0
    for c, r in ((0, 1), (2, 3)):
        h = (answer(policy, c) - answer(ref, c)) - (answer(policy, r) - answer(ref, r))
        dpo = dpo - torch.log(1 / (1 + torch.exp(-beta * h))) / 2
    n_chosen = (6 - STARTS[0]) + (6 - STARTS[2])  # 5 + 2 tokens
    nll = -(answer(policy, 0) + answer(policy, 2)) / n_chosen
    return dpo + alpha * nll, nll


def test_rpo_loss_metric_and_gradient_equal_the_hand_formula():
    torch.manual_seed(1)
    policy, ref = -torch.rand(4, 6, dtype=torch.float64), -torch.rand(4, 6, dtype=torch.float64)
    loss, nll_term, grad = _step(_rpo(0.7, ref), policy, split=1)
    leaf = policy.clone().requires_grad_(True)
    hand, hand_nll = _hand_rpo(leaf, ref, 0.7)
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    assert nll_term.item() == pytest.approx(hand_nll.item(), rel=1e-6)  # logged unweighted by alpha
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-7)
    assert leaf.grad[0, STARTS[0]:].abs().min() > 0 and leaf.grad[0, :STARTS[0]].eq(0).all()


def test_rpo_two_micro_batches_equal_one_with_unequal_answer_lengths():
    """The NLL is the mean over the step's chosen tokens (5 + 2 here), not a mean of per-micro-batch
    means (which would weigh the 2-token answer's tokens 2.5x)."""
    torch.manual_seed(2)
    policy, ref = -torch.rand(4, 6), -torch.rand(4, 6)
    one, two = _step(_rpo(1.3, ref), policy, split=1), _step(_rpo(1.3, ref), policy, split=2)
    assert two[0].item() == pytest.approx(one[0].item(), rel=1e-6)
    assert two[1].item() == pytest.approx(one[1].item(), rel=1e-6)
    torch.testing.assert_close(two[2], one[2], rtol=1e-5, atol=1e-7)
    per_micro_mean = (-policy[0, 1:].sum() / 5 - policy[2, 4:].sum() / 2) / 2
    assert abs(one[1].item() - per_micro_mean.item()) > 1e-3  # the test tells the two apart


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_alpha_zero_is_todays_dpo_loss_exactly(loss_type):
    """rpo_alpha=0: the loss is the DPO loss + the router terms, / M, bit for bit, with no NLL term
    and no count of chosen tokens (no collective)."""
    from h64lm.objectives.pairwise import pair_logprobs
    from h64lm.objectives.preference import DPO_REDUCTION, dpo_loss

    torch.manual_seed(3)
    policy, ref = -torch.rand(4, 6), -torch.rand(4, 6)
    objective = _rpo(0.0, ref, loss_type=loss_type)
    batch = _rows([0, 1, 2, 3], [STARTS[i] for i in range(4)])
    objective.prepare_step(None, [batch])
    assert objective.step_chosen_tokens is None
    model = FixedModel(policy, aux=0.3)
    out = objective(model, batch, StepShare(0, 0, micro_batches=2, world_size=1))
    pol = model(batch.input_ids, batch.labels, token_logprobs=True)
    ref_pairs = objective.reference(batch)
    dpo, _ = dpo_loss(*pair_logprobs(pol, batch, DPO_REDUCTION[loss_type]), ref_pairs[:, 0], ref_pairs[:, 1],
                      beta=0.5, loss_type=loss_type)
    assert torch.equal(out.loss, (dpo + 0.5 * torch.tensor(0.3)) / 2)
    assert "nll_loss" not in out.terms


def test_rpo_counts_the_chosen_tokens_of_the_whole_step():
    from h64lm.objectives.pairwise import chosen_tokens

    batches = [_rows([0, 1], [STARTS[0], STARTS[1]]), _rows([2, 3], [STARTS[2], STARTS[3]])]
    assert chosen_tokens(batches).item() == 5 + 2  # rows 0 and 2 only, rejected rows 1, 3 not counted
