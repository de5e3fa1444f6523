import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def restore_thread_count():
    """`torch.set_num_threads` is process-wide: an in-process run with hardware.num_threads=1 (or a
    test that sets it) must not change the arithmetic of later tests, whose runs are compared bit
    for bit with subprocesses at the default thread count."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if os.environ.get("OMP_NUM_THREADS") != env:  # inherited by every later subprocess
        os.environ.pop("OMP_NUM_THREADS", None) if env is None else os.environ.update(OMP_NUM_THREADS=env)
