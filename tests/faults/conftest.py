"""Fixtures of the fault tests: one token cache, one corpus and one uninterrupted reference run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FAST, run_config, text_corpus

# Eight steps, a checkpoint every two: room to kill a run between checkpoints and after evals.
RUN = ["train.max_steps=8", "train.save_every=2", "train.eval_every=4", "train.keep_last=2"]


@pytest.fixture(scope="session")
def fault_cache(isolated_cache) -> Path:
    return isolated_cache


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return text_corpus(tmp_path_factory.mktemp("fault_corpus"))


@pytest.fixture(scope="session")
def base_args(corpus, fault_cache) -> list[str]:
    return FAST + ["data=text", f"data.path={corpus}"] + RUN


@pytest.fixture(scope="session")
def reference(tmp_path_factory, base_args) -> Path:
    """The run every recovered run must reproduce: the same overrides, never interrupted."""
    from h64lm.cli import run

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(run_config(base_args), run_dir, base_args)
    return run_dir
