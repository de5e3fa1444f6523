"""Bad data stops a run with one line naming the `data.*` (or `model.*`) key, before the model is
built. The data package's own unit tests are in tests/data/test_prepare.py; these go through the
whole `run` entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.fault_cases import bad_data_cases, write_bad_files
from h64lm.cli import run
from tests.helpers import FAST, run_config

CASES = [c.name for c in bad_data_cases(Path("."), Path("."))]


@pytest.fixture
def no_model(monkeypatch):
    """Building the model is the expensive part that bad data must never reach."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built although the data was bad")

    monkeypatch.setattr("h64lm.train.loop.build_model", refuse)  # every layout builds through it


@pytest.mark.parametrize("name", CASES)
def test_bad_data_stops_in_one_line_before_the_model(tmp_path, fault_cache, corpus, no_model, name):
    write_bad_files(tmp_path)
    case = next(c for c in bad_data_cases(tmp_path, corpus) if c.name == name)
    args = FAST + ["data=text"] + case.overrides
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        run(run_config(args), tmp_path / "run", args)
    message = str(e.value)
    assert "\n" not in message and message.startswith(case.message_start), message
    assert not (tmp_path / "run" / "checkpoints").exists()
