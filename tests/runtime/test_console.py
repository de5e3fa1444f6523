"""Every command a run prints as a hint works when pasted: parsed as a shell would (shlex) and
composed as run.py would, it names this run's own folder and keeps the job's own overrides."""

import shlex
from pathlib import Path

import pytest

from h64lm.config import build_run_config, compose
from h64lm.runtime.console import continue_command, final_summary_line, launcher

ODD = Path("/tmp/my runs/sweep, one/3 'quoted' \"x\"")  # a space, a comma (a Hydra sweep), quotes


def _args(line: str, script: str = "run.py") -> list[str]:
    argv = shlex.split(line)
    return argv[argv.index(script) + 1:]


def _hints(line: str) -> dict[str, str]:
    """{'Evaluate': command, 'Generate': command, 'Report': command} of the closing line."""
    hints, rest = {}, line.split("steps.  ", 1)[1]
    for part in rest.split("  "):
        name, _, cmd = part.partition(": ")
        hints[name] = cmd
    return hints


@pytest.mark.parametrize("run_dir", [Path("/tmp/outputs/2026-01-01/12-00-00"), ODD])
def test_closing_line_commands_compose_to_this_run(run_dir):
    line = final_summary_line(run_dir, {"best_val_loss": 4.0, "final_val_loss": 4.1, "step": 10})
    hints = _hints(line)
    assert set(hints) == {"Evaluate", "Generate", "Report"}
    for mode in ("Evaluate", "Generate"):
        run = build_run_config(compose(_args(hints[mode])))
        assert run.mode == {"Evaluate": "eval", "Generate": "generate"}[mode]
        assert run.checkpoint == str(run_dir)
    assert build_run_config(compose(_args(hints["Generate"]))).prompt
    assert _args(hints["Report"], "experiments/report.py") == [str(run_dir)]  # this run, not its parent folder


def test_report_of_a_sweep_job_covers_its_sweep():
    line = final_summary_line(ODD / "3", {"best_val_loss": 4.0, "step": 10}, sweep_dir=ODD)
    assert _args(_hints(line)["Report"], "experiments/report.py") == [str(ODD)]


def test_continue_command_keeps_the_jobs_overrides():
    """A stopped sweep job: its own overrides (the swept value included), resume=auto, its folder."""
    overrides = ["model=moe_1b", "data.seq_len=64", "optim.lr=0.01", "logger.tags=[a,b]",
                 "train.resume=null", "hydra.run.dir=elsewhere", "+logger.group=my group"]
    line = continue_command(overrides, ODD)
    assert line.startswith("python run.py ")
    args = _args(line)
    run = build_run_config(compose(args))
    assert (run.model.num_layers, run.data.seq_len, run.optim.lr, run.logger.tags) == (
        build_run_config(compose(overrides[:4])).model.num_layers, 64, 0.01, ["a", "b"])
    assert run.train.resume == "auto" and run.logger.group == "my group"
    cfg = compose(args, return_hydra_config=True)
    assert cfg.hydra.run.dir == str(ODD)


def test_launcher_names_torchrun_with_the_jobs_process_counts():
    assert launcher({}) == "python run.py"
    assert launcher({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}) == (
        "torchrun --nproc_per_node=4 run.py")
    assert launcher({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x"}) == (
        "torchrun --nnodes=2 --nproc_per_node=8 run.py")
