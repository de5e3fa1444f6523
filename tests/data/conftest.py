"""Shared, session-scoped data fixtures: one converted tokenizer and one wiki excerpt corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from h64lm.data import DataConfig, load_tokenizer, prepare_corpus
from tests.data.helpers import write_wikitext


@pytest.fixture(scope="session")
def session_cache(isolated_cache) -> Path:
    return isolated_cache


@pytest.fixture(scope="session")
def tokenizer(session_cache):
    return load_tokenizer(DataConfig(cache_dir=str(session_cache)))


@pytest.fixture(scope="session")
def wiki_corpus(session_cache, tokenizer):
    return prepare_corpus(DataConfig(cache_dir=str(session_cache)), tokenizer)


@pytest.fixture(scope="session")
def wikitext2_valid(tmp_path_factory) -> Path:
    """A WikiText-layout file made from the shipped Wikipedia excerpt (tests/data/helpers.py)."""
    return write_wikitext(tmp_path_factory.mktemp("wikitext") / "valid.txt")
