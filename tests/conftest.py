import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """One token/tokenizer cache for the session, inherited by subprocesses: no test writes to
    ~/.cache, and the corpora are tokenized once."""
    path = tmp_path_factory.mktemp("h64lm_cache")
    previous = os.environ.get("H64LM_CACHE_DIR")
    os.environ["H64LM_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("H64LM_CACHE_DIR", None)
    else:
        os.environ["H64LM_CACHE_DIR"] = previous
