"""Verifiable rewards on GSM8K-style completions."""

import pytest

from h64lm.objectives.rewards import (
    exact_match_reward,
    extract_answer,
    format_reward,
    normalise_answer,
    weighted_rewards,
)

SOLUTION = "Tom has 3 apples and buys 4 more.\n3 + 4 = 7\n#### 7"


@pytest.mark.parametrize("text,expected", [
    (SOLUTION, "7"),
    ("work\n####  1,000 \nmore", "1,000"),
    ("#### 3\nactually\n#### 5", "5"),  # the last marker is the answer
    ("no marker here", None),
    ("####\n", None),  # empty answer line
    ("the answer is 7 #### 7", None),  # the marker must start a line
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw,canonical", [
    ("1,000", "1000"), ("42.0", "42"), ("42.", "42"), ("$5", "5"), ("-3.50", "-3.5"),
    ("0.25", "0.25"), ("-0", "0"), (" 18 ", "18"), ("  two  apples ", "two apples"), ("nan", "nan"),
])
def test_normalise_answer(raw, canonical):
    assert normalise_answer(raw) == canonical


def test_exact_match_compares_by_value():
    assert exact_match_reward("so\n#### 1,000.00", "1000") == 1.0
    assert exact_match_reward(SOLUTION, "8") == 0.0
    assert exact_match_reward("3 + 4 = 7", "7") == 0.0  # no answer line, no credit


def test_format_reward_ignores_correctness():
    assert format_reward("#### 99") == 1.0
    assert format_reward("99") == 0.0


def test_weighted_sum():
    reward = weighted_rewards([(exact_match_reward, 1.0), (format_reward, 0.1)])
    assert reward(SOLUTION, "7") == pytest.approx(1.1)
    assert reward("#### 6", "7") == pytest.approx(0.1)
    assert reward("7", "7") == 0.0
    with pytest.raises(ValueError, match="at least one"):
        weighted_rewards([])
