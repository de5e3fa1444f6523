"""Bad configurations fail before the model is built, in one line naming the key to change.

A table of wrong types, typos, impossible shapes and out-of-range values, checked in-process
through Hydra's composition and `validate_run`; a few go through `python run.py` for the
one-line / exit-code contract. (tests/train/test_config.py holds the schema's own unit tests.)
"""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from h64lm.cli import EXIT_BAD_INPUT
from h64lm.config import validate_run
from tests.helpers import FAST, compose_cfg, run_cli

# (overrides, the key the message must name)
BAD = [
    (["train.max_steps=many"], "train.max_steps"),  # wrong type
    (["optim.lr=fast"], "optim.lr"),
    (["model.hiden_size=64"], "hiden_size"),  # typo
    (["+model.hiden_size=64"], "model.hiden_size"),  # typo that bypasses the schema
    (["+train.lr=0.1"], "train.lr"),  # right key, wrong group
    (["model=huge"], "model/huge"),  # no such preset
    (["model.num_attention_heads=3"], "model.num_attention_heads"),  # 128 % 3 != 0
    (["model.hidden_size=36", "model.num_attention_heads=4"], "model.hidden_size"),  # odd head_dim
    (["model.num_kv_heads=0"], "model.num_kv_heads"),
    (["model.num_experts_per_token=9"], "model.num_experts_per_token"),  # top-k > experts
    (["model.moe_layers=[1,9]"], "model.moe_layers"),  # a layer that does not exist
    (["model.moe_layers=sometimes"], "model.moe_layers"),
    (["model.sliding_window=0"], "model.sliding_window"),  # window 0
    (["model.position_encoding=xpos"], "model.position_encoding"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.capacity_factor=0"], "model.capacity_factor"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["optim.lr=0"], "optim.lr"),  # non-positive lr
    (["optim.beta2=1.0"], "optim.beta1 and optim.beta2"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["hardware.precision=fp64"], "hardware.precision"),  # unknown precision
    (["hardware.device=tpu"], "hardware.device"),
    (["data.seq_len=1024"], "data.seq_len=1024 exceeds model.max_position_embeddings"),  # no ALiBi
    (["train.extra_eval_seq_lens=[4096]"], "train.extra_eval_seq_lens"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data=text"], "data.path"),  # text without a file
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.global_batch_size=3", "train.batch_size=2"], "train.global_batch_size"),
    (["train.global_batch_size=8", "train.batch_size=2", "train.grad_accum=3"], "train.grad_accum"),
    (["logger.name=tensorboard"], "logger.name"),
    (["gen.temperature=-0.5"], "gen.temperature"),
]


def _failure(overrides: list[str]) -> str:
    """The message a bad configuration fails with, from composition or from `validate_run`."""
    try:
        cfg = compose_cfg(overrides)
    except ConfigCompositionException as e:
        return str(e.__cause__ or e)
    with pytest.raises(ValueError) as e:
        validate_run(cfg)
    message = str(e.value)
    assert "\n" not in message, message  # one line
    return message


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configuration_names_its_key(overrides, key):
    assert key in _failure(overrides)


def test_batch_that_does_not_divide_the_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    message = _failure(["train.global_batch_size=6", "train.batch_size=1"])
    assert message.startswith("train.global_batch_size=6 is not a multiple of train.batch_size=1 x 4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = validate_run(compose_cfg(["train.global_batch_size=8", "train.batch_size=2"]))
    assert parts["train"].grad_accum == 2  # 8 = 2 per rank x 2 ranks x 2 micro-steps


@pytest.mark.parametrize("overrides,line", [
    (["model.num_experts_per_token=9"], "error: model.num_experts_per_token=9 must be <= model.num_experts=4"),
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
