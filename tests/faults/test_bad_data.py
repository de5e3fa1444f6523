"""Bad data stops a run with one line naming the `data.*` (or `model.*`) key, before the model is
built. The data package's own unit tests are in tests/data/test_prepare.py; these go through the
whole `run` entry point."""

from __future__ import annotations

import os

import pytest

from h64lm.cli import run
from tests.helpers import FAST, compose_cfg


@pytest.fixture
def no_model(monkeypatch):
    """Building the model is the expensive part that bad data must never reach."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built although the data was bad")

    monkeypatch.setattr("h64lm.train.loop.H64LMForCausalLM", refuse)


def _fails(tmp_path, overrides: list[str]) -> str:
    args = FAST + ["data=text"] + overrides
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        run(compose_cfg(args), tmp_path / "run", args)
    message = str(e.value)
    assert "\n" not in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()
    return message


def test_missing_path(tmp_path, fault_cache, no_model):
    assert _fails(tmp_path, [f"data.path={tmp_path}/nowhere.txt"]) == (
        f"data.path={tmp_path}/nowhere.txt does not exist")


def test_empty_file(tmp_path, fault_cache, no_model):
    (tmp_path / "empty.txt").write_text("")
    message = _fails(tmp_path, [f"data.path={tmp_path}/empty.txt"])
    assert message.startswith(f"data.path={tmp_path}/empty.txt has 0 document(s)")


def test_corpus_shorter_than_one_window(tmp_path, fault_cache, no_model):
    (tmp_path / "short.txt").write_text("Only a handful of words.")
    message = _fails(tmp_path, [f"data.path={tmp_path}/short.txt",
                                f"data.val_path={tmp_path}/short.txt"])
    assert message.startswith("data.seq_len=32: the train split has") and "lower data.seq_len" in message


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, fault_cache, corpus, no_model):
    message = _fails(tmp_path, [f"data.path={corpus}", "model.vocab_size=1000"])
    assert message.startswith("model.vocab_size=1000 is smaller than the tokenizer's 32000 ids")


def test_tokenizer_folder_that_does_not_exist(tmp_path, fault_cache, corpus, no_model):
    message = _fails(tmp_path, [f"data.path={corpus}", f"data.tokenizer={tmp_path}/none"])
    assert message.startswith(f"data.tokenizer='{tmp_path}/none' is neither 'mistral'")


@pytest.mark.xfail(strict=True, reason="h64lm/data/tokenizer.py passes transformers' multi-line "
                   "'cannot instantiate' error through for a folder without tokenizer files")
def test_tokenizer_folder_without_a_tokenizer(tmp_path, fault_cache, corpus, no_model):
    (tmp_path / "tok").mkdir()
    assert "data.tokenizer" in _fails(tmp_path, [f"data.path={corpus}", f"data.tokenizer={tmp_path}/tok"])


@pytest.mark.xfail(strict=True, reason="h64lm/data/files.py replaces undecodable bytes with a "
                   "warning, so a binary file renamed .txt trains on noise")
def test_binary_file(tmp_path, fault_cache, no_model):
    noise = b"".join(os.urandom(3000) + b"\n\n" for _ in range(40))  # 40 'paragraphs'
    (tmp_path / "noise.txt").write_bytes(noise)
    assert "data.path" in _fails(tmp_path, [f"data.path={tmp_path}/noise.txt"])
