"""Every config group and preset composes; typos and bad values fail before any work starts."""

import pytest
from hydra.errors import ConfigCompositionException

from h64lm.config import ConfigError, RunConfig, build_run_config
from h64lm.data.config import SFT_SOURCES
from tests.helpers import CONF, compose_cfg

GROUPS = ["model", "data", "optim", "hardware", "logger", "stage"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if option in ("text", "chat"):
        overrides.append("data.path=/nonexistent/checked-later.txt")
    if group == "data" and option in SFT_SOURCES:  # conversations are for the fine-tuning stage
        overrides.append("stage=sft")
    if group == "stage" and option in ("sft", "rl"):
        overrides.append("data=arithmetic")
    if group == "stage" and option in ("reward", "dpo"):
        overrides.append("data=preference_arithmetic")
    cfg = compose_cfg(overrides)
    run = build_run_config(cfg)
    assert isinstance(run, RunConfig)
    for key, value in cfg[group].items():  # the option's values reach the typed config unchanged
        if value != "???":
            assert getattr(getattr(run, group), key) == value, f"{group}.{key}"


def test_default_composition_is_tiny_wiki_cpu_friendly():
    cfg = compose_cfg([])
    assert cfg.mode == "train"
    assert cfg.data.name == "wiki_excerpt"
    assert cfg.hardware.device == "auto"
    run = build_run_config(cfg)
    assert run.model.num_layers == cfg.model.num_layers == 4


@pytest.mark.parametrize("override", ["model.hiden_size=1", "train.max_stpes=3", "optim.lrr=1"])
def test_typo_rejected_at_compose_time(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg([override])
    assert override.split("=")[0].split(".")[-1] in str(e.value.__cause__ or e.value)


def test_plus_override_inside_schema_group_rejected_before_work():
    cfg = compose_cfg(["+model.typo=1"])  # Hydra lets `+` past the schema...
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.typo"):
        build_run_config(cfg)  # ...so building the RunConfig refuses it


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
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "="):
        build_run_config(cfg)


def test_wrong_type_rejected_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["train.max_steps=many"])


def test_seq_len_beyond_rope_positions_is_rejected():
    cfg = compose_cfg(["model.position_encoding=rope", "model.max_position_embeddings=64",
                       "data.seq_len=128"])
    with pytest.raises(ConfigError, match="data.seq_len gives 128 positions, more than "
                       "model.max_position_embeddings=64"):
        build_run_config(cfg)


def test_eval_without_checkpoint_is_rejected():
    with pytest.raises(ConfigError, match="checkpoint=PATH"):
        build_run_config(compose_cfg(["mode=eval"]))


def test_window_that_never_applies_is_flagged():
    with pytest.warns(UserWarning, match="model.sliding_window=2048 >= data.seq_len=256"):
        build_run_config(compose_cfg(["model.sliding_window=2048", "model.position_encoding=alibi"]))


@pytest.mark.parametrize("override,key", [
    ("optim.lr=inf", "optim.lr"), ("optim.beta1=nan", "optim.beta1"), ("gen.temperature=inf", "gen.temperature"),
    ("model.rope_theta=nan", "model.rope_theta"), ("data.val_fraction=nan", "data.val_fraction"),
    ("hardware.peak_tflops=inf", "hardware.peak_tflops"),
])
def test_non_finite_floats_are_rejected(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "=(inf|nan) must be a finite number"):
        build_run_config(compose_cfg([override]))


@pytest.mark.parametrize("override", ["train.val_batch_size=-1", "train.val_batch_size=0",
                                      "hardware.num_threads=-1", "hardware.num_threads=0", "train.seed=-1",
                                      "hardware.timeout_s=0", "data.num_proc=0", "gen.top_k=0"])
def test_integer_ranges_are_checked(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "=-?[0-9]+ must be >= "):
        build_run_config(compose_cfg([override]))


def _schemas():
    import dataclasses

    from h64lm.config import GenConfig, HardwareConfig, LoggerConfig, OptimConfig, TrainConfig
    from h64lm.data import DataConfig
    from h64lm.model import H64LMConfig

    for cls in (H64LMConfig, DataConfig, TrainConfig, OptimConfig, HardwareConfig, LoggerConfig, GenConfig,
                RunConfig):
        yield from ((cls, f) for f in dataclasses.fields(cls))


@pytest.mark.parametrize("cls,f", list(_schemas()), ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")))
def test_every_number_field_declares_its_range(cls, f):
    """The schema rule behind the two tests above: no integer or float key goes unchecked."""
    import typing

    hint = typing.get_type_hints(cls)[f.name]
    is_optional = typing.get_origin(hint) is typing.Union
    base = [a for a in typing.get_args(hint) if a is not type(None)] if is_optional else [hint]
    if base[0] in (int, float):
        assert f.metadata.keys() - {"null"}, f"{cls.__name__}.{f.name} has no declared range"


def test_defaults_live_in_the_dataclasses():
    """An option file restates no default: every value it sets differs from the schema's."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.structured(RunConfig)
    for group in GROUPS:
        for option in _options(group):
            path = CONF / group / f"{option}.yaml"
            values = OmegaConf.load(path) or {}
            # a `# @package _global_` option (stage=reward also sets model.score_head) holds groups
            by_group = values if path.read_text().startswith("# @package _global_") else {group: values}
            for g, vals in by_group.items():
                same = [k for k in vals if not OmegaConf.is_missing(vals, k) and defaults[g][k] == vals[k]]
                assert not same, f"conf/{group}/{option}.yaml restates defaults of {g}: {same}"


@pytest.mark.parametrize("overrides,message", [
    (["optim.warmup_steps=300"], "optim.warmup_steps=300 >= train.max_steps=300"),
    (["train.eval_every=400"], "train.eval_every=400 > train.max_steps=300"),
])
def test_settings_that_make_a_run_meaningless_are_flagged(overrides, message):
    with pytest.warns(UserWarning, match=message):
        build_run_config(compose_cfg(overrides))


def test_vocab_larger_than_the_tokenizer_is_flagged():
    from types import SimpleNamespace

    from h64lm.data import check_vocab

    with pytest.warns(UserWarning, match="model.vocab_size=32768 is larger than the tokenizer's 32000 ids"):
        check_vocab(SimpleNamespace(vocab_size=32000), 32768)
