"""Exact-match accuracy of greedy answers on the held-out test problems of the arithmetic task
(h64lm/data/tasks/arithmetic.py): what `stage=sft data=arithmetic` fine-tunes for, measured in the
training loop (`h64lm.train.callbacks.ExactMatch`) and by `mode=eval` alike.

The test split is disjoint from the train and validation splits that `data=arithmetic` trains and
validates on; the first `n` problems are scored, so runs with the same `n` are comparable.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

from torch import nn

from h64lm.data.chat import ChatFormat
from h64lm.data.tasks.arithmetic import make_splits
from h64lm.data.tasks.scoring import score_questions

__all__ = ["TASK_SOURCES", "arithmetic_exact_match"]

TASK_SOURCES = ("arithmetic",)  # data sources with a held-out test split to score


def arithmetic_exact_match(model: nn.Module, n: int, max_new_tokens: int, batch_size: int,
                           autocast: Callable[[], AbstractContextManager] = nullcontext,
                           chat: ChatFormat | None = None) -> float:
    """Share of the first `n` test problems whose greedy answer (KV cache, until `</s>`) ends
    with the right `#### N`."""
    if n < 1:
        raise ValueError(f"stage.eval_examples={n}: score at least one problem")
    problems = make_splits()["test"][:n]
    was_training = model.training
    model.eval()
    with autocast():
        score = score_questions(model, chat or ChatFormat(), [p.question for p in problems],
                                [p.answer for p in problems], max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
    model.train(was_training)
    return score
