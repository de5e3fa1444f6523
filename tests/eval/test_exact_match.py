"""Exact match on the arithmetic test split: a model that answers right scores 1, wrong scores 0."""

import math

import pytest
import torch
from torch import nn

from h64lm.data.chat import ChatFormat, Message
from h64lm.data.tasks.arithmetic import make_splits
from h64lm.eval.exact_match import arithmetic_exact_match, paired_diff


class _Answering(nn.Module):
    """Continues each left-padded prompt with the tokens of a fixed answer to its question."""

    def __init__(self, chat: ChatFormat, answer_of: dict[str, str]):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.chat = chat
        self.replies = {}
        for question, answer in answer_of.items():
            prompt = chat.prompt([Message("user", question)])
            full = chat.encode([Message("user", question), Message("assistant", answer)]).tokens
            self.replies[tuple(prompt)] = full[len(prompt):]  # the answer's tokens and </s>

    def generate(self, ids, max_new_tokens, attention_mask=None, **kwargs):
        rows = []
        for row, mask in zip(ids.tolist(), attention_mask.tolist()):
            reply = self.replies[tuple(t for t, m in zip(row, mask) if m)][:max_new_tokens]
            rows.append(row + reply + [self.chat.eos_id] * (max_new_tokens - len(reply)))
        return torch.tensor(rows)


def test_right_answers_score_one_and_wrong_ones_zero():
    chat = ChatFormat()
    problems = make_splits()["test"][:5]
    right = _Answering(chat, {p.question: p.answer for p in problems})
    assert arithmetic_exact_match(right, 5, 64, batch_size=2, chat=chat) == 1.0
    wrong = _Answering(chat, {p.question: p.answer.replace("####", "#### 1") for p in problems})
    assert arithmetic_exact_match(wrong, 5, 64, batch_size=2, chat=chat) == 0.0
    half = _Answering(chat, {p.question: p.answer if i < 2 else "no idea" for i, p in enumerate(problems)})
    assert arithmetic_exact_match(half, 5, 64, batch_size=3, chat=chat) == 0.4


def test_paired_diff_by_hand():
    base = [True, True, False, False, True, False]
    run = [True, False, True, True, True, False]
    d = paired_diff(base, run)
    # differences 0, -1, +1, +1, 0, 0: mean 1/6, sample variance (sum of squared deviations) / 5
    diffs = [0, -1, 1, 1, 0, 0]
    mean = 1 / 6
    var = sum((x - mean) ** 2 for x in diffs) / 5
    assert d.diff == pytest.approx(mean)
    assert d.two_se == pytest.approx(2 * math.sqrt(var / 6))
    assert (d.only_base, d.only_run) == (1, 2)
    assert d.verdict == "within noise"
    assert paired_diff([False] * 50, [True] * 40 + [False] * 10).verdict == "higher"
    assert paired_diff([True] * 50, [True] * 10 + [False] * 40).verdict == "lower"


def test_paired_diff_refuses_unequal_lists():
    with pytest.raises(ValueError, match="equally long"):
        paired_diff([True, False], [True])
