"""Bradley-Terry and DPO/IPO losses and their TRL-named metrics against hand computations."""

import math

import pytest
import torch

from h64lm.objectives.preference import bradley_terry_loss, dpo_loss

# two pairs of fixed sequence log-probs
PC, PR = [-10.0, -8.0], [-12.0, -7.0]  # policy: chosen, rejected
RC, RR = [-11.0, -8.5], [-11.5, -7.5]  # reference
BETA = 0.5


def _t(values):
    return torch.tensor(values)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_and_accuracy_by_hand():
    loss, m = bradley_terry_loss(_t([2.0, 0.0, 1.0]), _t([1.0, 0.5, 1.0]))
    margins = [1.0, -0.5, 0.0]
    assert loss.item() == pytest.approx(-sum(_log_sigmoid(d) for d in margins) / 3)
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)  # a tie is not a win
    assert m["rewards/margins"] == pytest.approx(sum(margins) / 3)
    assert m["rewards/chosen"] == pytest.approx(1.0)
    assert m["rewards/rejected"] == pytest.approx(2.5 / 3)


def test_dpo_sigmoid_loss_and_every_metric_by_hand():
    loss, m = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA)
    # pair 0: chosen ratio 1, rejected ratio -0.5 -> h = 1.5; pair 1: 0.5 and 0.5 -> h = 0
    h = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    assert h == [1.5, 0.0]
    assert loss.item() == pytest.approx(-(_log_sigmoid(0.75) + _log_sigmoid(0.0)) / 2)
    assert m["rewards/chosen"] == pytest.approx((0.5 * 1.0 + 0.5 * 0.5) / 2)
    assert m["rewards/rejected"] == pytest.approx((0.5 * -0.5 + 0.5 * 0.5) / 2)
    assert m["rewards/margins"] == pytest.approx((0.75 + 0.0) / 2)
    assert m["rewards/accuracies"] == pytest.approx(0.5)  # pair 1 ties
    assert m["logps/chosen"] == pytest.approx(-9.0)
    assert m["logps/rejected"] == pytest.approx(-9.5)


def test_label_smoothing_mixes_both_directions():
    eps = 0.1
    loss, _ = dpo_loss(_t(PC[:1]), _t(PR[:1]), _t(RC[:1]), _t(RR[:1]), beta=BETA,
                       label_smoothing=eps)
    assert loss.item() == pytest.approx(-(1 - eps) * _log_sigmoid(0.75) - eps * _log_sigmoid(-0.75))


def test_ipo_loss_regresses_onto_half_inverse_beta():
    loss, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, loss_type="ipo")
    target = 1 / (2 * BETA)  # = 1
    assert loss.item() == pytest.approx(((1.5 - target) ** 2 + (0.0 - target) ** 2) / 2)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-3.0, -20.0, -7.5])
    other = torch.tensor([-4.0, -1.0, -9.0])
    loss, m = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = _t([-5.0]).requires_grad_(), _t([-5.0]).requires_grad_()
    loss, _ = dpo_loss(pc, pr, _t([-5.0]), _t([-5.0]), beta=BETA)
    loss.backward()
    # d/dh of -log sigma(beta h) at h = 0 is -beta / 2
    assert pc.grad.item() == pytest.approx(-BETA / 2)
    assert pr.grad.item() == pytest.approx(BETA / 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="hinge"), "loss_type='hinge'"),
    (dict(beta=0.0), "beta=0.0"),
    (dict(label_smoothing=0.5), "label_smoothing=0.5"),
    (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid only"),
])
def test_bad_options_are_refused(kwargs, match):
    args = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), **args)
