"""The trainer under FSDP2 / expert parallelism (2 gloo processes under torchrun) against one
process at the same global batch, and sharded checkpoints resumed at another layout."""

import json
import sys

import pytest

from h64lm.parallel import ParallelLayout
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import FAST, run_cli, run_config, text_corpus

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Cross-entropy + z-loss only: both are means over equal token counts, so additive over ranks (the
# Switch loss multiplies two batch means). 5 validation windows split 3 / 2 over the ranks: the
# rank with fewer runs a batch that counts 0 tokens, in step with the other.
COMMON = FAST + ["model.router_aux_loss_coef=0", "train.global_batch_size=4", "data.val_windows=5",
                 "train.max_steps=5", "optim.schedule_steps=5"]
TWO = ["train.batch_size=2", "hardware=fsdp", "hardware.device=cpu"]


def _train(tmp_path, name, extra, two=False):
    corpus = text_corpus(tmp_path)
    args = COMMON + ["data=text", f"data.path={corpus}", f"hydra.run.dir={tmp_path / name}"] + extra
    done = run_cli(args + (TWO if two else ["train.batch_size=4"]), cwd=tmp_path,
                   launcher=TORCHRUN if two else None)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp_path / name / "metrics.jsonl")


def _assert_same(expected, got, steps):
    assert [r["step"] for r in got] == steps
    by_step = {r["step"]: r for r in expected}
    for r in got:
        for key in ("loss", "grad_norm", "tokens"):
            assert r[key] == pytest.approx(by_step[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)
        if "val_loss" in r:
            assert r["val_loss"] == pytest.approx(by_step[r["step"]]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_and_expert_parallel_match_one_process(tmp_path):
    one = _train(tmp_path, "one", [])
    _assert_same(one, _train(tmp_path, "fsdp", [], two=True), [1, 2, 3, 4, 5])
    _assert_same(one, _train(tmp_path, "ddp_ep2", ["hardware.strategy=ddp", "hardware.ep=2"], two=True),
                 [1, 2, 3, 4, 5])
    ckpts = tmp_path / "fsdp" / "checkpoints"
    assert (ckpts / "last").read_text().strip() == "step_0000005"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "last", "step_0000003", "step_0000005"]
    assert (tmp_path / "fsdp" / "best_model.safetensors").is_file()


@pytest.mark.slow
def test_checkpoints_resume_across_layouts(tmp_path):
    uninterrupted = _train(tmp_path, "one", [])
    # 2-rank FSDP + EP=2 trains 3 steps; one process resumes it to 5
    _train(tmp_path, "a", ["train.max_steps=3", "hardware.ep=2", "train.async_save=true"], two=True)
    assert (tmp_path / "a" / "checkpoints" / "last").read_text().strip() == "step_0000003"
    resumed = _train(tmp_path, "a", ["train.resume=auto"])
    _assert_same(uninterrupted, resumed[-2:], [4, 5])
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*")) == [
        "step_0000003", "step_0000005"]  # one layout at every world size
    # one process trains 3 steps; 2-rank FSDP resumes it to 5
    _train(tmp_path, "b", ["train.max_steps=3"])
    resumed = _train(tmp_path, "b", ["train.resume=auto"], two=True)
    _assert_same(uninterrupted, resumed[-2:], [4, 5])
    assert (tmp_path / "b" / "checkpoints" / "last").read_text().strip() == "step_0000005"
    # mode=eval reads a sharded directory into a plain model
    out = run_cli(["mode=eval", f"checkpoint={tmp_path / 'b'}", "hardware=cpu", "logger=none"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next((tmp_path / "b" / "evals").glob("*/eval.json")).read_text())
    assert result["val_loss"] == pytest.approx(uninterrupted[-1]["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_muon_under_fsdp_and_expert_parallel_matches_one_process(tmp_path):
    """Muon on sharded matrices: FSDP's row shards are gathered and orthogonalised whole, expert-
    parallel experts are updated by their owner; saved at 2-rank FSDP + EP=2, resumed in one process."""
    muon = ["optim=muon", "optim.muon_ns_dtype=fp32"]
    one = _train(tmp_path, "one", muon)
    _assert_same(one, _train(tmp_path, "fsdp", muon, two=True), [1, 2, 3, 4, 5])
    _assert_same(one, _train(tmp_path, "ddp_ep2", muon + ["hardware.strategy=ddp", "hardware.ep=2"], two=True),
                 [1, 2, 3, 4, 5])
    _train(tmp_path, "a", muon + ["train.max_steps=3", "hardware.ep=2"], two=True)
    _assert_same(one, _train(tmp_path, "a", muon + ["train.resume=auto"])[-2:], [4, 5])


def test_layout_errors_name_hardware_ep():
    run = run_config(["model.num_experts=4", "hardware.ep=2"])
    with pytest.raises(ConfigError, match=r"hardware.ep=2 must divide the world size 3"):
        ParallelLayout.from_run(run, 3)
    with pytest.raises(ConfigError, match=r"hardware.ep=2 needs MoE layers"):
        ParallelLayout.from_run(run_config(["hardware.ep=2", "model.moe_layers=none"]), 2)
    with pytest.raises(ConfigError, match=r"^hardware.ep=3 must divide model.num_experts=8"):
        run_config(["hardware.ep=3"])
    with pytest.raises(ConfigError, match=r"^hardware.precision=fp16 is not supported with hardware.strategy=fsdp"):
        run_config(["hardware=fsdp", "hardware.precision=fp16"])
