"""experiments/paired_exact_match.py: per-problem scoring wired to the arithmetic test split, and
the paired differences it prints (h64lm/eval/exact_match.py's, tested by hand there)."""

import json

import pytest
from torch import nn

from experiments import paired_exact_match as pem
from h64lm.data.tasks.arithmetic import make_splits
from h64lm.eval import exact_match as em


class _Named(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name


def test_main_scores_each_checkpoint_on_the_same_test_problems(monkeypatch, tmp_path, capsys):
    problems = make_splits()["test"][:10]
    right = {"base": {0, 1, 2, 3}, "run": {0, 1, 2, 3, 4, 5, 6, 7}}
    seen = []

    def fake_load(checkpoint, device):
        return _Named(checkpoint), None

    def fake_answers(model, chat, questions, **kwargs):
        seen.append(list(questions))
        return [f"... #### {p.answer if i in right[model.name] else 'x'}" for i, p in enumerate(problems)]

    monkeypatch.setattr(pem, "load_trained_model", fake_load)
    monkeypatch.setattr(em, "answer_questions", fake_answers)
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
