"""Scoring: a model that emits the right answers scores 1, one that emits wrong ones scores 0."""

from __future__ import annotations

import torch

from h64lm.data.chat import ChatFormat, Message
from h64lm.data.tasks.arithmetic import make_splits
from h64lm.data.tasks.scoring import answer_questions, score_questions


class _Scripted(torch.nn.Module):
    """generate() answering each prompt (found through the attention mask) with a fixed text."""

    def __init__(self, chat, answers: dict):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.chat, self.answers = chat, answers  # prompt ids (tuple) -> answer ids

    def generate(self, ids, max_new_tokens, temperature, eos_token_id, pad_token_id,
                 attention_mask):
        assert temperature == 0.0 and eos_token_id == self.chat.eos_id
        rows = [self.answers[tuple(row[mask.bool()].tolist())] + [eos_token_id]
                for row, mask in zip(ids, attention_mask)]
        width = max(map(len, rows))
        tail = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([ids, tail], dim=1)


def test_scores_follow_the_generated_answers():
    chat = ChatFormat()
    problems = make_splits(0, (1, 3, 3))["test"]
    questions, golds = [p.question for p in problems], [p.answer for p in problems]
    prompts = [tuple(chat.prompt([Message("user", q)])) for q in questions]
    sp = chat._mistral.instruct_tokenizer.tokenizer

    def scripted(offset: int) -> _Scripted:
        return _Scripted(chat, {pr: sp.encode(f"so {'x ' * i}#### {p.result + offset}",
                                              bos=False, eos=False)
                                for i, (pr, p) in enumerate(zip(prompts, problems))})

    answers = answer_questions(scripted(0), chat, questions, batch_size=2)
    assert [a.split("####")[1].strip() for a in answers] == [str(p.result) for p in problems]
    assert score_questions(scripted(0), chat, questions, golds, batch_size=2) == 1.0
    assert score_questions(scripted(1), chat, questions, golds, batch_size=3) == 0.0
