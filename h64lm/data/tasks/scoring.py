"""Score a causal LM on question/answer problems: greedy answers to chat prompts, exact match.

Each question becomes a one-turn chat prompt (h64lm/data/chat.py); prompts are left-padded into
batches and answered greedily through the KV cache until `</s>`; the final `#### N` of each answer
is compared with the gold one (h64lm/data/tasks/arithmetic.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from h64lm.data.chat import ChatFormat, Message
from h64lm.data.tasks.arithmetic import accuracy

__all__ = ["answer_questions", "score_questions"]


@torch.no_grad()
def answer_questions(model, chat: ChatFormat, questions: Sequence[str], max_new_tokens: int = 48,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers (text) to one-turn chat prompts, in order."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [chat.prompt([Message("user", q)]) for q in questions[i:i + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), chat.eos_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = model.generate(ids.to(device), max_new_tokens, temperature=0.0,
                             eos_token_id=chat.eos_id, pad_token_id=chat.eos_id,
                             attention_mask=mask.to(device))
        answers += [chat.decode(row[width:].tolist()) for row in out.cpu()]
    return answers


def score_questions(model, chat: ChatFormat, questions: Sequence[str], golds: Sequence[str],
                    **kwargs) -> float:
    """Exact-match accuracy of the model's greedy answers (see `answer_questions`)."""
    return accuracy(answer_questions(model, chat, questions, **kwargs), golds)
