"""Every config group and preset composes; typos and bad values fail before any work starts."""

import pytest
from hydra.errors import ConfigCompositionException

from h64lm.config import ConfigError, validate_run
from tests.helpers import CONF, compose_cfg

GROUPS = ["model", "data", "optim", "hardware", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if option == "text":
        overrides.append("data.path=/nonexistent/checked-later.txt")
    cfg = compose_cfg(overrides)
    parts = validate_run(cfg)
    assert parts[group] is not None
    assert cfg[group] is not None


def test_default_composition_is_tiny_wiki_cpu_friendly():
    cfg = compose_cfg([])
    assert cfg.mode == "train"
    assert cfg.data.name == "wiki_excerpt"
    assert cfg.hardware.device == "auto"
    parts = validate_run(cfg)
    assert parts["model"].num_layers == cfg.model.num_layers


@pytest.mark.parametrize("override", ["model.hiden_size=1", "train.max_stpes=3", "optim.lrr=1"])
def test_typo_rejected_at_compose_time(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([override])
    assert override.split("=")[0].split(".")[-1] in str(e.value.__cause__ or e.value)


def test_plus_override_inside_schema_group_rejected_before_work():
    try:
        cfg = compose_cfg(["+model.typo=1"])
    except ConfigCompositionException:
        return  # Hydra itself refused it: also fine
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.typo"):
        validate_run(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("hardware.precision=fp8", "hardware.precision"),
        ("optim.schedule=exp", "optim.schedule"),
        ("train.batch_size=0", "train.batch_size"),
        ("logger.mode=maybe", "logger.mode"),
        ("mode=serve", "mode"),
        ("gen.top_p=1.5", "gen.top_p"),
    ],
)
def test_bad_values_name_their_key(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_run(cfg)


def test_wrong_type_rejected_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["train.max_steps=many"])


def test_seq_len_beyond_rope_positions_is_rejected():
    cfg = compose_cfg(["model.position_encoding=rope", "model.max_position_embeddings=64",
                       "data.seq_len=128"])
    with pytest.raises(ConfigError, match="data.seq_len=128 exceeds model.max_position_embeddings=64"):
        validate_run(cfg)


def test_eval_without_checkpoint_is_rejected():
    with pytest.raises(ConfigError, match="checkpoint=PATH"):
        validate_run(compose_cfg(["mode=eval"]))


def test_window_that_never_applies_is_flagged():
    with pytest.warns(UserWarning, match="model.sliding_window=2048 >= data.seq_len=256"):
        validate_run(compose_cfg(["model.sliding_window=2048", "model.position_encoding=alibi"]))
