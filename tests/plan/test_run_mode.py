"""`python run.py mode=plan`: the composed config's layouts, what the plan assumed, the time and
GPU-hours of the token budget, and launch commands that keep the user's overrides and compose
when pasted; nothing else written."""

import dataclasses
import math
import re
import shlex

import pytest

from h64lm.config import build_run_config, compose
from h64lm.modes import plan_layouts_for
from h64lm.plan import format_plan, plan_layouts, recommend
from h64lm.validation import ConfigError
from tests.helpers import run_cli, run_config


def _printed_commands(text: str) -> list[list[str]]:
    """Every `run.py` command the plan printed, as the argument list after `run.py`."""
    commands = []
    for line in text.splitlines():
        if " run.py " in line:
            argv = shlex.split(line.strip().removeprefix("SLURM: "))
            commands.append(argv[argv.index("run.py") + 1:])
    return commands


def test_plan_mode_prints_the_library_plan_and_launch_commands(tmp_path):
    args = ["mode=plan", "model=moe_1b", "data.seq_len=2048", "train.batch_size=2", "plan.gpus=16",
            "plan.gpu_mem_gb=80", "logger=none"]
    out = run_cli(args, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run = run_config(args)
    kept = ["data.seq_len=2048", "train.batch_size=2", "logger=none"]
    expected = format_plan(plan_layouts(run.model, gpus=16, seq_len=2048, micro_batch=2, grad_accum=1,
                                        precision="bf16", optim=run.optim.name, peak_tflops=989.0, mfu=0.4,
                                        gpu_mem_gb=80.0,
                                        headroom=0.1), "moe_1b", 80.0, 8, kept)
    assert expected in out.stdout
    launch = [line.strip() for line in out.stdout.splitlines() if "run.py" in line][-2:]
    assert launch[0].startswith("torchrun --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 "
                                "--nproc_per_node=8 run.py hardware=ddp model=moe_1b hardware.strategy=")
    assert launch[0].endswith("data.seq_len=2048 train.batch_size=2 logger=none")
    assert launch[1].startswith("SLURM: python run.py -m hydra/launcher=slurm hydra.launcher.nodes=2 "
                                "hydra.launcher.tasks_per_node=8 hydra.launcher.gpus_per_node=8 hardware=ddp")
    # only outputs/plans/<date>/<time>/ (plan.txt, run.log, Hydra's record) was written
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("outputs/plans/") for w in written), written
    assert any(w.endswith("plan.txt") for w in written)


def test_every_printed_command_composes_to_the_planned_run(capsys):
    """Pasted, each command gives the run that was planned: the user's overrides (a precision, a
    path with a space, a `+` key) survive shell quoting, and the layout's keys are the recommended ones."""
    args = ["mode=plan", "model=moe_1b", "data=text", "data.path=/my corpus/a b.txt", "data.seq_len=512",
            "train.batch_size=3", "hardware.precision=fp32", "optim=adamw", "+logger.tags=[x]", "plan.gpus=4",
            "hydra.run.dir=/tmp/elsewhere"]
    run = run_config(args)
    text = plan_layouts_for(run, "moe_1b", args[1:], None)
    best = recommend(plan_layouts(run.model, gpus=4, seq_len=512, micro_batch=3, precision="fp32",
                                  optim="adamw", peak_tflops=989.0, mfu=0.4, gpu_mem_gb=80.0, headroom=0.1))
    commands = _printed_commands(text)
    assert len(commands) == 3  # the recommendation, torchrun, SLURM
    for argv in commands:
        assert not any("elsewhere" in a for a in argv)  # the plan's own output folder is not the run's
        pasted = build_run_config(compose([a for a in argv if a != "-m"]))
        assert pasted.mode == "train"
        assert (pasted.data.name, pasted.data.path, pasted.data.seq_len) == ("text", "/my corpus/a b.txt", 512)
        assert (pasted.train.batch_size, pasted.hardware.precision, pasted.optim.name) == (3, "fp32", "adamw")
        assert pasted.logger.tags == ["x"]
        assert pasted.model == dataclasses.replace(run.model, gradient_checkpointing=best.checkpointing)
        assert (pasted.hardware.strategy, pasted.hardware.ep, pasted.model.gradient_checkpointing) == (
            best.strategy, best.ep, best.checkpointing)
        assert pasted.hardware.distributed


def test_plan_names_the_defaults_it_assumed(capsys):
    text = plan_layouts_for(run_config(["mode=plan", "train.batch_size=4"]), "tiny", ["mode=plan", "train.batch_size=4"],
                            None)
    first = text.splitlines()[0]
    run = run_config([])
    assert first.startswith(f"planned for: data.seq_len={run.data.seq_len} train.batch_size=4 ")
    defaults = first.split("so the defaults: ")[1].split(", ")
    assert "data.seq_len" in defaults and "hardware.precision" in defaults and "train.batch_size" not in defaults


@pytest.mark.parametrize("tokens", [None, 3e9])
def test_time_and_gpu_hours_of_the_token_budget(tokens):
    args = ["mode=plan", "model=moe_1b", "plan.gpus=8", "train.max_steps=1000"] + (
        [f"plan.tokens={tokens}"] if tokens else [])
    run = run_config(args)
    text = plan_layouts_for(run, "moe_1b", args, None)
    best = recommend(plan_layouts(run.model, gpus=8, seq_len=run.data.seq_len, micro_batch=run.train.batch_size,
                                  precision="bf16", optim=run.optim.name, peak_tflops=989.0, mfu=0.4,
                                  gpu_mem_gb=80.0, headroom=0.1))
    steps = 1000 if tokens is None else math.ceil(tokens / best.tokens_per_step)
    line = next(x for x in text.splitlines() if "GPU-hours" in x)
    assert f"{steps:,} steps x {best.tokens_per_step:,} tokens" in line
    gpu_hours = float(line.split(" = ")[-1].split(" GPU-hours")[0].replace(",", ""))
    assert gpu_hours == pytest.approx(steps * best.time_s * 8 / 3600, rel=0.01, abs=0.05)


def test_absurd_model_is_arithmetic_and_its_table_aligns(monkeypatch):
    """20,000 layers of width 65,536: one meta model of at most two blocks is built for the whole
    plan, each block kind's activations are counted once per layout, and the table stays aligned."""
    import h64lm.plan.activations as activations
    import h64lm.plan.params as params

    built, blocks = [], []
    model_class, block = params.H64LMForCausalLM, activations._block
    monkeypatch.setattr(params, "H64LMForCausalLM", lambda c: built.append(c.num_layers) or model_class(c))
    monkeypatch.setattr(activations, "_block", lambda *a: blocks.append(1) or block(*a))
    args = ["mode=plan", "model.num_layers=20000", "model.hidden_size=65536", "model.num_attention_heads=512",
            "model.num_kv_heads=64", "plan.gpus=64"]
    layouts = plan_layouts(run_config(args).model, gpus=64, seq_len=4096, micro_batch=1, precision="bf16",
                           optim="muon", peak_tflops=989.0, mfu=0.4, gpu_mem_gb=80.0)
    assert built == [2]
    assert len(blocks) <= 2 * len(layouts)
    text = format_plan(layouts, "tiny", 80.0)
    rows = text.split("\n\n")[1].splitlines()
    assert len(rows) == len(layouts) + 1 and len({len(r) for r in rows}) == 1  # right-aligned to one edge
    ends = [m.end() for m in re.finditer(r"\S+", rows[0])][1:]  # where each right-aligned header ends
    for row in rows[1:]:  # every cell ends under its header, two spaces before the next cell
        assert all(row[e - 1] != " " and row[e:e + 2] in ("", "  ") for e in ends), rows
    assert all("e+" not in r for r in rows)  # engineering units, not scientific notation


def test_plan_keys_are_validated():
    with pytest.raises(ConfigError, match=r"^plan.mfu=1.5 must be > 0 and <= 1"):
        run_config(["mode=plan", "plan.mfu=1.5"])
    with pytest.raises(ConfigError, match=r"^plan.tokens=-1.0 must be > 0"):
        run_config(["mode=plan", "plan.tokens=-1"])
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=6 is not a multiple"):
        plan_layouts_for(run_config(["mode=plan", "train.global_batch_size=6", "plan.gpus=4"]), "tiny", [],
                         None)
