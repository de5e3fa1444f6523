"""Verifiable rewards for sampled completions: answer exact match, answer format, weighted sums.

The answer convention is GSM8K's: the final answer sits on a line `#### <answer>` after the
worked solution. Numbers are compared by value after normalisation ("1,000" == "1000",
"42.0" == "42", "$5" == "5", "-3." == "-3"); anything that is not a number is compared as
whitespace-collapsed text.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional, Sequence, Tuple

__all__ = ["RewardFn", "extract_answer", "normalise_answer", "exact_match_reward",
           "format_reward", "weighted_rewards"]

RewardFn = Callable[[str, str], float]  # (completion, reference answer) -> reward

_ANSWER_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_NUMBER_DECORATION = re.compile(r"[,\s$€£%]")


def extract_answer(completion: str) -> Optional[str]:
    """The text after the LAST `####` line start, or None when there is no non-empty one (a model
    may restate the marker; the final one is its answer)."""
    found = [a for a in _ANSWER_LINE.findall(completion) if a]
    return found[-1] if found else None


def normalise_answer(answer: str) -> str:
    """A canonical string: numbers by value (no thousands separators, currency, trailing zeros or
    trailing dot, "-0" -> "0"), other text with whitespace collapsed."""
    text = answer.strip().rstrip(".")
    number = _NUMBER_DECORATION.sub("", text)
    try:
        value = Decimal(number)
    except InvalidOperation:
        return " ".join(text.split())
    if not value.is_finite():
        return " ".join(text.split())
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final `####` answer equals the reference (normalised), else 0."""
    got = extract_answer(completion)
    return float(got is not None and normalise_answer(got) == normalise_answer(answer))


def format_reward(completion: str, answer: str = "") -> float:
    """1.0 when the completion has a non-empty `#### answer` line, whatever its value, else 0:
    an early signal that the format is learnt before the arithmetic is."""
    return float(extract_answer(completion) is not None)


def weighted_rewards(parts: Sequence[Tuple[RewardFn, float]]) -> RewardFn:
    """sum_i w_i f_i(completion, answer) as one reward function, e.g.
    weighted_rewards([(exact_match_reward, 1.0), (format_reward, 0.1)])."""
    if not parts:
        raise ValueError("weighted_rewards needs at least one (reward function, weight) pair")

    def reward(completion: str, answer: str) -> float:
        return sum(weight * fn(completion, answer) for fn, weight in parts)

    return reward
