"""The language-modelling objective through the trainer's step function (`forward_backward`).

References: one forward/backward of the concatenated batch with F.cross_entropy's mean over its
targets (global token normalisation), and the loss formula of earlier versions, mean over
micro-batches of ce + aux_coef * aux + z_coef * z (equal unmasked micro-batches)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from h64lm.data import IGNORE_INDEX, Batch
from h64lm.objectives import LanguageModelling, StepShare
from h64lm.objectives.lm import lm_loss
from h64lm.train.step import forward_backward
from tests.model.conftest import build


def _micro_batches(masked: bool) -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    out = []
    for m in range(3):
        ids = torch.randint(0, 97, (2, 11), generator=g)  # [B, T+1]
        labels = ids[:, 1:].clone()
        if masked:  # micro-batch m keeps (m + 1) * 3 targets of its 20: very unequal counts
            flat = labels.view(-1)
            keep = torch.randperm(flat.numel(), generator=g)[: (m + 1) * 3]
            dropped = torch.ones_like(flat, dtype=torch.bool)
            dropped[keep] = False
            flat[dropped] = IGNORE_INDEX
        out.append(Batch(ids[:, :-1], labels))
    return out


def _step(model, batches):
    model.zero_grad(set_to_none=True)
    terms, _, _, _ = forward_backward(LanguageModelling(model.config), model, model, batches, 1,
                                      torch.device("cpu"), contextlib.nullcontext, lambda loss: loss.backward())
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe_layers", ["none", "all"])
def test_unequal_target_counts_give_the_gradient_of_the_whole_batch(moe_layers):
    # router terms off: they are per-micro-batch means by definition (see h64lm/objectives/lm.py)
    model = build(moe_layers=moe_layers, router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
    batches = _micro_batches(masked=True)
    assert len({b.num_targets() for b in batches}) == 3
    terms, grads = _step(model, batches)

    model.zero_grad(set_to_none=True)
    x = torch.cat([b.input_ids for b in batches])
    y = torch.cat([b.labels for b in batches])
    logits = model(x).logits  # [3B, T, V]
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)  # mean over targets
    ref.backward()
    assert terms["ce"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_per_micro_batch_means_would_differ():
    """The reference above can tell: the old mean of per-micro-batch means is another loss here."""
    model = build(moe_layers="none")
    batches = _micro_batches(masked=True)
    with torch.no_grad():
        means = [model(b.input_ids, labels=b.labels).ce for b in batches]
        terms, _, _, _ = forward_backward(LanguageModelling(model.config), model, model, batches, 1,
                                          torch.device("cpu"), contextlib.nullcontext, lambda loss: None)
    assert abs(sum(means).item() / 3 - terms["ce"].item()) > 1e-3


def test_equal_unmasked_micro_batches_keep_the_old_loss_bit_for_bit():
    model = build(moe_layers="all", router_aux_loss_coef=0.3, router_z_loss_coef=0.1).train()
    batches = _micro_batches(masked=False)
    terms, _ = _step(model, batches)
    old = torch.zeros(4)
    with torch.no_grad():
        for b in batches:
            out = model(b.input_ids, labels=b.labels, return_logits=False)
            loss = out.ce + 0.3 * out.aux + 0.1 * out.z  # the model's own composition of earlier versions
            old += torch.stack([loss, out.ce, out.aux, out.z]) / 3
    got = torch.stack([terms[k] for k in ("loss", "ce", "aux", "z")])
    assert torch.equal(got, old), (got, old)
    assert old[2] > 0 and old[3] > 0  # the router terms are really in it


def test_lm_loss_weighs_the_models_terms_as_the_objective_does_one_micro_batch():
    """The model returns ce, aux and z but no loss; the coefficients are the objective's."""
    model = build(moe_layers="all", router_aux_loss_coef=0.3, router_z_loss_coef=0.1).train()
    batch = _micro_batches(masked=False)[0]
    out = model(batch.input_ids, labels=batch.labels, return_logits=False)
    assert not hasattr(out, "loss")
    loss = lm_loss(out, model.config)
    assert torch.equal(loss, out.ce + 0.3 * out.aux + 0.1 * out.z) and out.aux > 0 and out.z > 0
    n = batch.num_targets()
    assert torch.equal(LanguageModelling(model.config)(model, batch, StepShare(n, n, 1, 1)).loss, loss)


def test_step_share_weight():
    assert StepShare(20, 60, 3, 1).weight == 1.0  # equal counts: exactly one
    assert StepShare(5, 60, 3, 2).weight == 0.5  # 5 of 60 targets over 2 ranks x 3 micro-batches
    assert StepShare(0, 0, 2, 1).weight == 0.0  # nothing to predict anywhere: no NaN
