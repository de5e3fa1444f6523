"""A preparation killed while its `datasets.map` workers tokenize (num_proc=2) leaves no lock
held and no partial folder: a new preparation finishes (experiments/faults.py runs both SIGKILL
and SIGTERM; the fast in-process version is tests/data/test_cache.py)."""

import fcntl
import signal

import pytest

from experiments.data_faults import (
    finish_preparation,
    kill_while_tokenizing,
    start_preparation,
    workers_left,
    write_corpus,
)


@pytest.mark.slow  # ~60 s: two process starts and seconds of tokenization on 2 cores
def test_kill9_while_workers_tokenize_then_a_new_preparation_finishes(tmp_path):
    corpus, cache = write_corpus(tmp_path / "c.jsonl"), tmp_path / "cache"
    proc = start_preparation(corpus, cache, 2, tmp_path / "killed.log")
    workers = kill_while_tokenizing(proc, cache, 2, signal.SIGKILL)
    assert workers_left(workers, wait_s=3) == [], "map workers outlived their killed parent"
    lock = next((cache / "corpus").glob("*.lock"))
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anything still holds it
    code, _ = finish_preparation(corpus, cache, tmp_path / "again.log", timeout=300)
    assert code == 0, (tmp_path / "again.log").read_text()[-2000:]
    assert [p.name for p in (cache / "corpus").iterdir() if ".tmp-" in p.name] == []
