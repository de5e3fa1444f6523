"""Sweep presets: each composes into the expected grid of valid jobs; the SLURM launcher config
goes through the submitit plugin's own submission path (up to sbatch, which cannot run here)."""

import itertools
import os
import stat

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from h64lm.model import active_parameters_per_token, count_parameters
from tests.helpers import compose_cfg, run_config

EXPECTED_JOBS = {"moe_vs_dense": 3, "routing": 2 * 3 * 2 * 2, "positions": 3, "lr": 4, "balancing": 5 * 3,
                 "recipe": 2 * 2 * 2, "sft": 1}


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs `python run.py -m OVERRIDES` launches: the preset's `hydra.sweeper.params`, then
    the command line (which wins), expanded into their cartesian product (the basic sweeper's rule),
    using only Hydra's public override parser."""
    presets = [o for o in overrides if o.startswith("experiment=")]  # compose takes no sweeps
    cfg = compose_cfg(presets, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    axes: dict[str, list[str]] = {}  # a later override of the same key replaces the earlier axis
    for o in OverridesParser.create().parse_overrides(params + overrides):
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes[key] = [f"{key}={v}" for v in values]
    return [list(job) for job in itertools.product(*axes.values())]


@pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
def test_preset_composes_into_its_grid_of_valid_jobs(name):
    jobs = sweep_jobs([f"experiment={name}"])
    assert len(jobs) == EXPECTED_JOBS[name]
    assert len({tuple(sorted(j)) for j in jobs}) == len(jobs), "duplicate jobs"
    for job in jobs:
        cfg = compose_cfg(job, return_hydra_config=True)
        assert cfg.experiment_name == name  # the W&B group
        assert f"multirun/{name}/" in cfg.hydra.sweep.dir  # sweeps never share a directory
        run_config(job)  # every key valid, before anything runs


def test_a_sweep_axis_can_be_overridden_on_the_command_line():
    jobs = sweep_jobs(["experiment=routing", "model.capacity_factor=1.25",
                       "model.router_aux_loss_coef=0.01,0.1"])
    assert len(jobs) == 2 * 2 * 2
    assert all("model.capacity_factor=1.25" in job for job in jobs)


def test_freezing_the_router_is_one_sft_sweep():
    jobs = sweep_jobs(["experiment=sft", "train.freeze=[],[router]"])
    runs = [run_config(job) for job in jobs]
    assert [r.train.freeze for r in runs] == [[], ["router"]]
    assert all(r.stage.name == "sft" and r.data.name == "arithmetic" for r in runs)


def test_moe_vs_dense_arms_have_equal_active_parameters():
    """Same compute per token, more parameters: dense < moe8 < moe16 in total parameters, equal
    active parameters up to the router (hidden_size * num_experts per MoE layer)."""
    counts = {}
    for job in sweep_jobs(["experiment=moe_vs_dense"]):
        arm = next(o.split("=")[1] for o in job if o.startswith("arm="))
        m = run_config(job).model
        counts[arm] = (count_parameters(m), active_parameters_per_token(m), m)
    assert counts["dense"][2].moe_layer_indices() == []
    assert counts["moe16"][2].num_experts == 16 and counts["moe8"][2].num_experts == 8
    assert counts["dense"][0] < counts["moe8"][0] < counts["moe16"][0]
    dense_active = counts["dense"][1]
    for arm in ("moe8", "moe16"):
        m = counts[arm][2]
        router = len(m.moe_layer_indices()) * m.hidden_size * m.num_experts
        assert counts[arm][1] - router == dense_active, arm


def test_positions_sweep_validates_at_twice_the_training_length():
    for job in sweep_jobs(["experiment=positions"]):
        cfg = compose_cfg(job)
        assert list(cfg.train.extra_eval_seq_lens) == [2 * cfg.data.seq_len]


def test_slurm_launcher_builds_the_sbatch_job(tmp_path, monkeypatch):
    """Compose `hydra/launcher=slurm`, then run the plugin's real `launch` up to the point where
    submitit would call sbatch, and read the job parameters it would submit."""
    import submitit

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    srun = fake_bin / "srun"  # submitit refuses to build a SLURM executor without srun on PATH
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    submitted = {}

    def capture(executor, fn, *job_args):
        submitted["executor"], submitted["jobs"] = executor, list(zip(*job_args))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    cfg = compose_cfg(["experiment=lr", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["optim.lr=0.001"], ["optim.lr=0.003"]], initial_job_idx=0)

    assert [job[0] for job in submitted["jobs"]] == [["optim.lr=0.001"], ["optim.lr=0.003"]]
    # The executor's parameters are what submitit writes as #SBATCH lines.
    params = submitted["executor"]._executor.parameters
    assert params["partition"] == "gpu"
    assert params["gpus_per_node"] == 1 and params["ntasks_per_node"] == 1
    assert params["time"] == cfg.hydra.launcher.timeout_min
    assert (tmp_path / "sweep").is_dir()


TORCH_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT")


def test_each_task_of_a_multi_task_slurm_job_is_one_rank(monkeypatch):
    """tasks_per_node > 1: the environment SLURM and submitit give task 3 of 4 (2 nodes x 2)
    becomes the torchrun variables init_distributed reads."""
    from h64lm.runtime.distributed import export_slurm_ranks

    for key in TORCH_RANK_VARS:  # set then unset: monkeypatch restores them after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3",
             "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    export_slurm_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07"  # every rank meets at the first node


def test_a_single_task_job_stays_a_single_process(monkeypatch):
    from h64lm.runtime.distributed import export_slurm_ranks

    for key in TORCH_RANK_VARS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    export_slurm_ranks()
    assert "RANK" not in os.environ
