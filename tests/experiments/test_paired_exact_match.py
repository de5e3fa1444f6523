"""experiments/paired_exact_match.py: the paired difference against a hand computation, and the
per-problem scoring wired to the arithmetic test split."""

import json
import math

import pytest

from experiments import paired_exact_match as pem
from h64lm.data.tasks.arithmetic import make_splits


def test_paired_diff_by_hand():
    base = [True, True, False, False, True, False]
    run = [True, False, True, True, True, False]
    d = pem.paired_diff(base, run)
    # differences 0, -1, +1, +1, 0, 0: mean 1/6, sample variance (sum of squared deviations) / 5
    diffs = [0, -1, 1, 1, 0, 0]
    mean = 1 / 6
    var = sum((x - mean) ** 2 for x in diffs) / 5
    assert d.diff == pytest.approx(mean)
    assert d.two_se == pytest.approx(2 * math.sqrt(var / 6))
    assert (d.only_base, d.only_run) == (1, 2)
    assert d.verdict == "within noise"
    assert pem.paired_diff([False] * 50, [True] * 40 + [False] * 10).verdict == "higher"
    assert pem.paired_diff([True] * 50, [True] * 10 + [False] * 40).verdict == "lower"


def test_paired_diff_refuses_unequal_lists():
    with pytest.raises(ValueError, match="equally long"):
        pem.paired_diff([True, False], [True])


def test_main_scores_each_checkpoint_on_the_same_test_problems(monkeypatch, tmp_path, capsys):
    problems = make_splits()["test"][:10]
    right = {"base": {0, 1, 2, 3}, "run": {0, 1, 2, 3, 4, 5, 6, 7}}
    seen = []

    def fake_load(checkpoint, device):
        return checkpoint, None

    def fake_answers(model, chat, questions, **kwargs):
        seen.append(list(questions))
        return [f"... #### {p.answer if i in right[model] else 'x'}" for i, p in enumerate(problems)]

    monkeypatch.setattr(pem, "load_trained_model", fake_load)
    monkeypatch.setattr(pem, "answer_questions", fake_answers)
    out = tmp_path / "pem.json"
    result = pem.main(["base", "run", "--examples", "10", "--out", str(out)])
    assert seen == [[p.question for p in problems]] * 2
    assert result["outcomes"]["base"] == [i < 4 for i in range(10)]
    assert result["diffs"]["run"]["only_run"] == 4 and result["diffs"]["run"]["diff"] == pytest.approx(0.4)
    assert json.loads(out.read_text())["examples"] == 10
    printed = capsys.readouterr().out
    assert "base: 0.400" in printed and "run: 0.800  paired diff +0.400" in printed


def test_main_refuses_more_problems_than_the_split_has():
    with pytest.raises(SystemExit):
        pem.main(["a", "b", "--examples", "501"])
