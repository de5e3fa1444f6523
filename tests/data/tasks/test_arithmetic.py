"""The arithmetic task: correct answers, disjoint seeded splits, GSM8K-style answer extraction."""

from __future__ import annotations

import json
import re

import pytest

from h64lm.data.tasks.arithmetic import (
    accuracy,
    exact_match,
    extract_answer,
    make_splits,
    write_split,
)

SIZES = (3000, 200, 200)


def _solve(question: str) -> int:
    """An independent reading of the question text (not the generator's op table)."""
    a = int(re.search(r"has (\d+) ", question).group(1))
    b = int(re.search(r"(?:gets|away) (\d+)", question).group(1))
    if "more" in question:
        return a + b
    if "gives away" in question:
        return a - b
    assert "times as many" in question
    return a * b


@pytest.mark.parametrize("ops", [("add", "sub"), ("add", "sub", "mul")])
def test_answers_are_right_and_in_gsm8k_layout(ops):
    for p in make_splits(1, SIZES, ops=ops)["train"][:500]:
        expected = _solve(p.question)
        assert expected >= 0
        assert extract_answer(p.answer) == str(expected)
        step = re.search(r"so (\d+) ([-+*]) (\d+) = (\d+)\.\n#### \d+$", p.answer)
        assert step is not None, p.answer
        assert eval(f"{step[1]} {step[2]} {step[3]}") == int(step[4]) == expected


@pytest.mark.parametrize("held_out", ["problem", "numbers"])
def test_splits_are_disjoint_sized_and_seeded(held_out):
    splits = make_splits(0, SIZES, held_out=held_out)
    assert [len(splits[k]) for k in ("train", "val", "test")] == list(SIZES)
    questions = {k: {p.question for p in v} for k, v in splits.items()}
    assert all(len(questions[k]) == len(splits[k]) for k in splits)  # no duplicates inside
    assert not questions["test"] & questions["train"]
    assert not questions["val"] & (questions["train"] | questions["test"])
    if held_out == "numbers":
        facts = {k: {(p.op, p.a, p.b) for p in v} for k, v in splits.items()}
        assert not facts["test"] & facts["train"] and not facts["val"] & facts["train"]
    assert make_splits(0, SIZES, held_out=held_out) == splits
    assert make_splits(1, SIZES, held_out=held_out)["test"] != splits["test"]


def test_too_many_problems_asked_is_one_clear_error():
    with pytest.raises(ValueError, match="too few"):
        make_splits(0, (10**6, 10, 10), max_operand=3)
    with pytest.raises(ValueError, match="ops"):
        make_splits(0, SIZES, ops=("div",))


def test_extract_answer_and_exact_match():
    gsm8k = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
             "<<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert extract_answer(gsm8k) == "72"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("so 3 - 5 = -2.\n####  -2 apples") == "-2"
    assert extract_answer("#### 3\n#### 4") == "4"  # the last one counts
    assert extract_answer("the answer is 72") is None
    assert extract_answer("#### ") is None
    assert exact_match("blah\n#### 72", gsm8k)
    assert not exact_match("blah\n#### 71", gsm8k)
    assert not exact_match("72", gsm8k)  # no #### in the generation: no answer
    assert exact_match("#### 5", "5")
    assert accuracy(["#### 1", "#### 2", "x"], ["1", "#### 3", "0"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="as many"):
        accuracy(["#### 1"], [])


@pytest.mark.parametrize("fmt", ["gsm8k", "messages"])
def test_written_rows(tmp_path, fmt):
    problems = make_splits(0, (5, 2, 2))["test"]
    rows = [json.loads(line) for line in write_split(tmp_path / "t.jsonl", problems, fmt)
            .read_text().splitlines()]
    assert len(rows) == 2
    if fmt == "gsm8k":
        assert rows[0] == {"question": problems[0].question, "answer": problems[0].answer}
    else:
        assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]
        assert rows[1]["messages"][1]["content"] == problems[1].answer
