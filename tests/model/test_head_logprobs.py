"""Label log-probabilities from hidden states against the same from full logits."""

import pytest
import torch

from h64lm.model.head_logprobs import hidden_token_logprobs
from h64lm.model.loss import softcap
from h64lm.objectives.logprobs import token_logprobs


@pytest.mark.parametrize("cap", [None, 5.0])
def test_hidden_path_equals_full_logits_in_value_and_gradient(cap):
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 7))
    labels[0, :3] = -100
    upstream = torch.randn(2, 7)  # a generic d loss / d logp
    reference = token_logprobs(softcap(hidden @ weight.T, cap), labels)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), (hidden, weight))
    got = hidden_token_logprobs(hidden, weight, labels, logit_softcap=cap, chunk=3)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    assert torch.allclose(got, reference, atol=1e-5)
    assert got[0, :3].tolist() == [0.0, 0.0, 0.0]
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)
    with torch.no_grad():  # the frozen reference's path: values only
        assert torch.allclose(hidden_token_logprobs(hidden, weight, labels, cap), got)


def test_forward_gives_label_logprobs_and_scores_of_the_final_hidden_states(small_model):
    model = small_model(score_head=True, logit_softcap=4.0)
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[1, :4] = -100
    full = model(ids)
    out = model(ids, labels=labels, token_logprobs=True, return_logits=False)
    assert out.logits is None and out.ce is None
    assert torch.allclose(out.token_logprobs, token_logprobs(full.logits, labels), atol=1e-5)
    hidden = {}
    model.norm.register_forward_hook(lambda m, a, h: hidden.setdefault("h", h))
    model(ids)
    # the reward / value of each position: the head's one row applied to the final hidden state
    assert torch.allclose(out.scores, hidden["h"] @ model.score.weight[0], atol=1e-6)
    assert small_model().score is None and small_model()(ids).scores is None
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, token_logprobs=True)
