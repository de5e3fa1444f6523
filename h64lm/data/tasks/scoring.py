"""Score a causal LM on question/answer problems: greedy answers to chat prompts, exact match.

Each question becomes a one-turn chat prompt (h64lm/data/chat.py); prompts are left-padded into
batches and answered greedily through the KV cache until `</s>`; the final `#### N` of each answer
is compared with the gold one (h64lm/data/tasks/arithmetic.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from h64lm.data.chat import ChatFormat, Message
from h64lm.data.prompts import left_padded
from h64lm.data.tasks.arithmetic import accuracy

__all__ = ["answer_prompts", "answer_questions", "score_questions"]


@torch.no_grad()
def answer_prompts(model, chat: ChatFormat, prompts: Sequence[Sequence[int]], max_new_tokens: int = 48,
                   batch_size: int = 64) -> list[str]:
    """Greedy answers (text) to encoded chat prompts, in order."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[i:i + batch_size], chat.eos_id)
        out = model.generate(ids.to(device), max_new_tokens, temperature=0.0,
                             eos_token_id=chat.eos_id, pad_token_id=chat.eos_id,
                             attention_mask=mask.to(device))
        answers += [chat.decode(row[ids.shape[1]:].tolist()) for row in out.cpu()]
    return answers


def answer_questions(model, chat: ChatFormat, questions: Sequence[str], max_new_tokens: int = 48,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers (text) to one-turn chat prompts, in order."""
    return answer_prompts(model, chat, [chat.prompt([Message("user", q)]) for q in questions],
                          max_new_tokens, batch_size)


def score_questions(model, chat: ChatFormat, questions: Sequence[str], golds: Sequence[str],
                    **kwargs) -> float:
    """Exact-match accuracy of the model's greedy answers (see `answer_questions`)."""
    return accuracy(answer_questions(model, chat, questions, **kwargs), golds)
