"""Bad configurations fail before the model is built, in one line naming the key to change.

A table of wrong types, typos, impossible shapes and out-of-range values, checked in-process
through Hydra's composition and `build_run_config`; a few go through `python run.py` for the
one-line / exit-code contract. (tests/train/test_config.py holds the schema's own unit tests.)
"""

from __future__ import annotations

import os

import pytest
from hydra.errors import ConfigCompositionException

from experiments.fault_cases import BAD_CONFIGS
from h64lm.cli import EXIT_BAD_INPUT
from h64lm.config import build_run_config
from tests.helpers import FAST, compose_cfg, run_cli


def _failure(overrides: list[str]) -> str:
    """The message a bad configuration fails with, from composition or from `build_run_config`."""
    try:
        cfg = compose_cfg(overrides)
    except ConfigCompositionException as e:
        return str(e.__cause__ or e)
    with pytest.raises(ValueError) as e:
        build_run_config(cfg).train.micro_batches_per_step(int(os.environ.get("WORLD_SIZE", "1")))
    message = str(e.value)
    assert "\n" not in message, message  # one line
    return message


@pytest.mark.parametrize("overrides,key", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_configuration_names_its_key(overrides, key):
    assert key in _failure(overrides)


def test_batch_that_does_not_divide_the_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    message = _failure(["train.global_batch_size=6", "train.batch_size=1"])
    assert message.startswith("train.global_batch_size=6 is not a multiple of train.batch_size=1 x 4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    train = build_run_config(compose_cfg(["train.global_batch_size=8", "train.batch_size=2"])).train
    assert train.micro_batches_per_step(2) == 2  # 8 = 2 per rank x 2 ranks x 2 micro-steps


@pytest.mark.parametrize("overrides,line", [
    (["model.num_experts_per_token=9"],
     "error: model.num_experts_per_token=9 must be <= model.num_experts=4"),
    (["data=text"], "error: data=text needs data.path=<file or folder>"),
], ids=["top-k", "text-without-path"])
def test_cli_prints_one_line_and_exits_2_before_any_work(tmp_path, overrides, line):
    cache = tmp_path / "cache"  # a run that got as far as the tokenizer would create it
    run_dir = tmp_path / "run"
    proc = run_cli(FAST + overrides + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120,
                   env={"H64LM_CACHE_DIR": str(cache)})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert [x for x in proc.stderr.splitlines() if x.strip()] == [line]
    assert not cache.exists() and not (run_dir / "checkpoints").exists()


def test_cli_schema_error_is_hydras_message_not_a_traceback(tmp_path):
    proc = run_cli(["train.max_steps=many", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                   timeout=120)
    assert proc.returncode == 1
    assert "full_key: train.max_steps" in proc.stderr and "Traceback" not in proc.stderr
