"""Exact-match accuracy of greedy answers on the held-out test problems of the arithmetic task
(h64lm/data/tasks/arithmetic.py): what `stage=sft data=arithmetic` fine-tunes for, measured in the
training loop (`h64lm.train.callbacks.ExactMatch`) and by `mode=eval` alike.

The test split is disjoint from the train and validation splits that `data=arithmetic` trains and
validates on; the first `n` problems are scored, so runs with the same `n` are comparable, and
problem by problem: two checkpoints answer the same problems, so the error of their difference
is the spread of the per-problem differences (`paired_diff`), far smaller than two independent
errors when the checkpoints agree on most problems.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

from torch import nn

from h64lm.data.chat import ChatFormat
from h64lm.data.tasks.arithmetic import exact_match, make_splits
from h64lm.data.tasks.scoring import answer_questions

__all__ = ["TASK_SOURCES", "PairedDiff", "arithmetic_exact_match", "arithmetic_solved", "paired_diff"]

TASK_SOURCES = ("arithmetic",)  # data sources with a held-out test split to score


def arithmetic_solved(model: nn.Module, n: int, max_new_tokens: int, batch_size: int,
                      autocast: Callable[[], AbstractContextManager] = nullcontext,
                      chat: ChatFormat | None = None) -> list[bool]:
    """Per problem of the first `n` test problems: does the greedy answer (KV cache, until
    `</s>`) end with the right `#### N`?"""
    if n < 1:
        raise ValueError(f"stage.eval_examples={n}: score at least one problem")
    problems = make_splits()["test"][:n]
    was_training = model.training
    model.eval()
    with autocast():
        answers = answer_questions(model, chat or ChatFormat(), [p.question for p in problems],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.train(was_training)
    return [exact_match(a, p.answer) for a, p in zip(answers, problems)]


def arithmetic_exact_match(model: nn.Module, n: int, max_new_tokens: int, batch_size: int,
                           autocast: Callable[[], AbstractContextManager] = nullcontext,
                           chat: ChatFormat | None = None) -> float:
    """Share of the first `n` test problems answered right (`arithmetic_solved`)."""
    solved = arithmetic_solved(model, n, max_new_tokens, batch_size, autocast, chat)
    return sum(solved) / len(solved)


@dataclass(frozen=True)
class PairedDiff:
    diff: float        # mean over the problems of run - base (1 solved, 0 not)
    two_se: float      # 2 x the standard error of that mean
    only_base: int     # problems base solves and run does not (McNemar's b)
    only_run: int      # problems run solves and base does not (McNemar's c)

    @property
    def verdict(self) -> str:
        if abs(self.diff) <= self.two_se:
            return "within noise"
        return "higher" if self.diff > 0 else "lower"


def paired_diff(base: Sequence[bool], run: Sequence[bool]) -> PairedDiff:
    """Mean per-problem difference run - base, with 2 SE of that mean (sample std / sqrt n)."""
    if len(base) != len(run) or len(base) < 2:
        raise ValueError(f"paired_diff needs two equally long outcome lists of at least 2 problems "
                         f"(got {len(base)} and {len(run)})")
    d = [int(r) - int(b) for b, r in zip(base, run)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return PairedDiff(mean, 2 * math.sqrt(var / n), d.count(-1), d.count(1))
