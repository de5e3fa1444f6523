"""Label log-probabilities against log_softmax computed by hand from the definition."""

import math

import pytest
import torch

from h64lm.objectives.logprobs import sequence_logprobs, token_logprobs


def _reference(logits, labels):
    """log p(label) by the definition, one position at a time in plain Python."""
    out = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist()):
        row = []
        for z, y in zip(row_logits, row_labels):
            row.append(0.0 if y == -100 else z[y] - math.log(sum(math.exp(v) for v in z)))
        out.append(row)
    return torch.tensor(out)


def test_token_logprobs_match_the_definition_across_chunk_borders():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100  # prompt positions
    labels[2, -1] = -100
    expected = _reference(logits, labels)
    for chunk in (1, 4, 7, 1024):  # borders inside rows, across rows, one chunk
        assert torch.allclose(token_logprobs(logits, labels, chunk_rows=chunk), expected, atol=1e-5)


def test_sequence_sum_and_mean_by_hand():
    # vocabulary of 2 with logits (0, 0): every label has log-prob ln(1/2)
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[1, 0, -100], [-100, -100, -100]])
    assert sequence_logprobs(logits, labels, "sum").tolist() == pytest.approx([2 * math.log(0.5), 0.0])
    assert sequence_logprobs(logits, labels, "mean").tolist() == pytest.approx([math.log(0.5), 0.0])


def test_gradient_equals_softmax_minus_one_hot():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[2, -100, 5, 0]])
    sequence_logprobs(logits, labels).sum().backward()
    p = logits.detach().softmax(-1)
    expected = -p
    for t, y in enumerate(labels[0].tolist()):
        if y == -100:
            expected[0, t] = 0
        else:
            expected[0, t, y] += 1
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_bf16_logits_are_read_in_fp32():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 50).bfloat16()
    labels = torch.randint(0, 50, (2, 3))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, _reference(logits.float(), labels), atol=1e-5)


def test_bad_shapes_and_reduction_are_refused():
    with pytest.raises(ValueError, match="expected logits"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction='max'"):
        sequence_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), "max")
