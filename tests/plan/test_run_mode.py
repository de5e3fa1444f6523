"""`python run.py mode=plan`: the composed config's layouts, the recommended launch, nothing else written."""

import pytest

from h64lm.modes import plan_layouts_for
from h64lm.plan import format_plan, plan_layouts
from h64lm.validation import ConfigError
from tests.helpers import run_cli, run_config


def test_plan_mode_prints_the_library_plan_and_launch_commands(tmp_path):
    args = ["mode=plan", "model=moe_1b", "data.seq_len=2048", "train.batch_size=2", "plan.gpus=16",
            "plan.gpu_mem_gb=80", "logger=none"]
    out = run_cli(args, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run = run_config(args)
    expected = format_plan(plan_layouts(run.model, gpus=16, seq_len=2048, micro_batch=2, grad_accum=1,
                                        precision="bf16", optim=run.optim.name, peak_tflops=989.0, mfu=0.4,
                                        gpu_mem_gb=80.0,
                                        headroom=0.1), "moe_1b", 80.0)
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


def test_plan_keys_are_validated():
    with pytest.raises(ConfigError, match=r"^plan.mfu=1.5 must be > 0 and <= 1"):
        run_config(["mode=plan", "plan.mfu=1.5"])
    with pytest.raises(ConfigError, match=r"^train.global_batch_size=6 is not a multiple"):
        plan_layouts_for(run_config(["mode=plan", "train.global_batch_size=6", "plan.gpus=4"]), "tiny", [],
                         None)
