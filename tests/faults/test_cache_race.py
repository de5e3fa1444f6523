"""Two sweep jobs start at once on a fresh cache: both build nothing twice, both succeed, and the
token cache they share is whole (tests/data/test_prepare.py races `prepare_corpus` itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.fault_procs import run_losses, start_run


@pytest.mark.slow  # ~20 s of two full process starts; experiments/faults.py races three jobs
def test_two_jobs_prepare_one_cache(tmp_path, base_args, reference):
    cache = tmp_path / "cache"
    jobs = [start_run(base_args + ["train.max_steps=1", f"hydra.run.dir={tmp_path / f'job{i}'}"],
                      tmp_path, env={"H64LM_CACHE_DIR": str(cache)}, log_name=f"job{i}")
            for i in range(2)]
    codes = [job.wait(timeout=300) for job in jobs]
    assert codes == [0, 0], [(tmp_path / f"job{i}.err").read_text()[-2000:] for i in range(2)]

    folders = list((cache / "corpus").iterdir())
    corpora = [f for f in folders if f.is_dir()]
    assert len(corpora) == 1 and [f.name for f in folders if ".tmp-" in f.name] == []
    meta = json.loads((corpora[0] / "meta.json").read_text())
    assert meta["built_by_pid"] in [job.pid for job in jobs]
    for split in ("train", "val"):
        size = (corpora[0] / f"{split}.bin").stat().st_size
        assert size == meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize
    first = run_losses(reference)[1]  # the same windows as a cache built by one process alone
    assert [run_losses(tmp_path / f"job{i}")[1] for i in range(2)] == [first, first]
