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
