import pytest

from tests.hf.tiny import build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A saved 192-id HF fast tokenizer folder (built once per session, offline)."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(path)
    return path
