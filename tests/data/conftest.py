"""Shared, session-scoped data fixtures: one converted tokenizer and one wiki excerpt corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from h64lm.data import DataConfig, load_tokenizer, prepare_corpus

WIKITEXT2_VALID = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session")
def session_cache(isolated_cache) -> Path:
    return isolated_cache


@pytest.fixture(scope="session")
def tokenizer(session_cache):
    return load_tokenizer(DataConfig(cache_dir=str(session_cache)))


@pytest.fixture(scope="session")
def wiki_corpus(session_cache, tokenizer):
    return prepare_corpus(DataConfig(cache_dir=str(session_cache)), tokenizer)


@pytest.fixture
def wikitext2_valid() -> Path:
    if not WIKITEXT2_VALID.is_file():
        pytest.skip(f"{WIKITEXT2_VALID} is absent (the shared WikiText-2 file is not in this checkout)")
    return WIKITEXT2_VALID
