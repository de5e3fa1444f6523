"""The chunked LM-head cross-entropy equals the plain computation, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from h64lm.model.loss import chunked_cross_entropy


def test_chunked_ce_matches_plain_with_ignored_labels():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(53, 16, requires_grad=True)
    labels = torch.randint(0, 53, (37,))
    labels[[0, 5, 36]] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, chunk=8)
    loss.backward(torch.tensor(2.0))
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    (2.0 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(g_h, hidden.grad, atol=1e-6)
    assert torch.allclose(g_w, weight.grad, atol=1e-6)


def test_model_ce_without_logits_equals_with_logits(small_model):
    model = small_model(tie_word_embeddings=True).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    full = model(ids, labels=labels)
    full.ce.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = model(ids, labels=labels, return_logits=False)
    lean.ce.backward()
    assert lean.logits is None
    assert lean.ce.item() == pytest.approx(full.ce.item(), abs=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


@torch.no_grad()
def test_labels_are_aligned_not_shifted(small_model):
    """labels[b, t] is the target of position t: the model must not shift them again."""
    model = small_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids[:, 1:]
    ce = model(ids[:, :-1], labels=labels).ce
    logits = model(ids[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert ce.item() == pytest.approx(ref.item(), abs=1e-6)


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_evaluation_pays_no_head_backward(grad_mode):
    """Under no_grad the weights still require grad (needs_input_grad is True), yet only the
    forward GEMM may run: 2*N*d*V FLOPs, not the 3x that computing the gradients costs."""
    from torch.utils.flop_counter import FlopCounterMode

    N, d, V = 64, 16, 53
    hidden, weight = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    counter = FlopCounterMode(display=False)
    with getattr(torch, grad_mode)(), counter:
        chunked_cross_entropy(hidden, weight, labels, chunk=16)
    assert counter.get_total_flops() == 2 * N * d * V
    with FlopCounterMode(display=False) as training:  # with grad on, the gradient GEMMs run too
        chunked_cross_entropy(hidden, weight, labels, chunk=16)
    assert training.get_total_flops() >= 2 * 2 * N * d * V  # (the counter misses in-place addmm_)
