"""Read-only folders a run writes to (issue 23, class 3): one line naming the folder and the key to
change, exit 2, before any work; never an OSError traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import FAST, run_cli, text_corpus, tmpfs


@pytest.fixture
def read_only(tmp_path) -> Path:
    with tmpfs(tmp_path / "ro", "ro,size=1M") as mnt:
        yield mnt


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_read_only_run_directory(tmp_path, read_only):
    proc = run_cli(FAST + [f"hydra.run.dir={read_only / 'run'}"], cwd=tmp_path)
    line = _one_line_error(proc)
    assert str(read_only) in line and "hydra.run.dir=" in line


def test_read_only_sweep_directory(tmp_path, read_only):
    proc = run_cli(["-m", *FAST, f"hydra.sweep.dir={read_only / 'sweep'}"], cwd=tmp_path)
    line = _one_line_error(proc)
    assert str(read_only) in line and "hydra.sweep.dir=" in line


def test_read_only_cache_directory(tmp_path, read_only):
    corpus = text_corpus(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_cli(FAST + ["data=text", f"data.path={corpus}", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                   env={"H64LM_CACHE_DIR": str(read_only / "cache")})
    line = _one_line_error(proc)
    assert str(read_only / "cache") in line and "$H64LM_CACHE_DIR" in line
    proc = run_cli(FAST + ["data=text", f"data.path={corpus}", f"data.cache_dir={read_only}",
                           f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path)
    line = _one_line_error(proc)
    assert "data.cache_dir" in line and "not writable" in line
