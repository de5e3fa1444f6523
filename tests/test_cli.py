"""The command line's own messages: a mistyped key gets a "did you mean", every listed config group
works as `group=option`, a saved config's warnings are not repeated, other ranks stay quiet, and
`hardware=fsdp` without torchrun names itself as the fix."""

import shlex
import warnings

import pytest
import yaml

from h64lm.cli import EXIT_BAD_INPUT, mistyped_key
from h64lm.config import ConfigError, build_run_config, run_config_from_yaml, run_config_yaml
from h64lm.runtime.distributed import init_distributed
from tests.helpers import CONF, FAST, compose_cfg, run_cli, run_config


@pytest.mark.parametrize("typo,meant", [("model.hiden_size", "model.hidden_size"),
                                        ("train.max_stpes", "train.max_steps"), ("optim.lrr", "optim.lr"),
                                        ("trian.max_steps", "train.max_steps"), ("balanse", "balance")])
def test_mistyped_key_gets_did_you_mean(typo, meant):
    assert mistyped_key(["model=tiny", f"{typo}=1"]).startswith(
        f"{typo} is not a configuration key; did you mean {meant}?")


def test_real_keys_and_hydras_own_are_not_questioned():
    assert mistyped_key(["-m", "model=tiny", "balance=aux_free", "arm=moe8", "experiment=recipe",
                         "model.hidden_size=64,128", "logger.tags=[a]", "+x.y=1", "~logger.entity",
                         "hydra.run.dir=/tmp/x", "hydra/launcher=slurm", "--cfg", "job"]) is None
    assert mistyped_key(["model.zzzzzzzz=1"]) is None  # far from any key: Hydra's message lists them


def test_cli_prints_did_you_mean_in_one_line(tmp_path):
    proc = run_cli(["model.hiden_size=1"], cwd=tmp_path, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.strip().splitlines() == [
        "error: model.hiden_size is not a configuration key; did you mean model.hidden_size? "
        "(python run.py --cfg job lists them)"]
    assert not (tmp_path / "outputs").exists()


def test_schema_unknown_key_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.hiden_size; did you mean model\.hidden_size\?"):
        build_run_config(compose_cfg(["+model.hiden_size=1"]))


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"))
def test_every_listed_group_works_without_plus(group):
    """`--help` lists every folder of conf/ as a group: `group=option` must compose, and the
    option's values must reach the config (read from its YAML here, independently)."""
    option = sorted(p for p in (CONF / group).glob("*.yaml"))[0]
    cfg = compose_cfg([f"{group}={option.stem}"])
    values = yaml.safe_load(option.read_text()) or {}
    if option.read_text().startswith("# @package model"):
        for key, value in values.items():
            assert cfg.model[key] == value, f"{group}={option.stem}: model.{key}"


def test_experiment_arms_still_override_their_default_arm():
    assert compose_cfg(["experiment=balancing"]).model.router_aux_loss_scope == "micro_batch"
    aux_free = yaml.safe_load((CONF / "balance" / "aux_free.yaml").read_text())
    cfg = compose_cfg(["experiment=balancing", "balance=aux_free"])
    assert cfg.model.router_bias_update_rate == aux_free["router_bias_update_rate"]
    assert cfg.model.moe_layers == "all"  # the experiment's own keys still apply on top


def test_saved_config_does_not_repeat_its_training_warnings():
    args = ["optim.warmup_steps=50", "train.max_steps=20", "train.eval_every=10"]
    with pytest.warns(UserWarning, match="warmup_steps"):  # the training run itself warns...
        saved = run_config(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ...reading its config back (eval, export, resume) does not
        assert run_config_from_yaml(run_config_yaml(saved)).optim.warmup_steps == 50


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_zero_prints_warnings(tmp_path, rank):
    """A config warning, then a failure before any work: rank 0 prints the warning, rank 1 does not."""
    args = FAST + ["optim.warmup_steps=50", "train.max_steps=20", "data=text", f"data.path={tmp_path}/missing.txt"]
    proc = run_cli(args + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300, env={"RANK": rank})
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert ("warning: optim.warmup_steps=50" in proc.stderr) == (rank == "0"), proc.stderr[-2000:]


def test_fsdp_without_torchrun_names_fsdp(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError) as e:
        init_distributed(run_config(["hardware=fsdp"]).hardware)
    fix = str(e.value).split(": ", 1)[1].split(" (")[0]
    assert str(e.value).startswith("hardware=fsdp needs a torchrun launch")
    argv = shlex.split(fix)
    assert argv[:2] == ["torchrun", "--nproc_per_node=N"]
    hardware = run_config(argv[argv.index("run.py") + 1:]).hardware
    assert (hardware.strategy, hardware.distributed) == ("fsdp", True)
