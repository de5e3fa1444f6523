"""stage=sft on two gloo processes under DDP, FSDP2 and expert parallelism against one process:
every logged number of every step (the loss normalised by the step's global count of assistant
tokens, the gradient norm, validation, MoE routing against the starting model, exact match).

The reference is one process running each rank's sequence as its own micro-batch
(`train.batch_size=1 train.grad_accum=2`) on one intra-op thread, as torchrun gives each worker:
the two ranks' gradients then meet in a sum of two terms either way, which is exact. What is left
is rounding from sums taken in another order: FSDP adds the ranks' partial sums of squares for the
gradient norm, and validation adds the ranks' sums. That moves the last bit or two of an fp32
number (measured at most 2.3e-7 relative over 6 steps), so floats are compared to 1e-6 relative.
Dividing by each rank's count times the world size instead of the global count moved the step-2
loss by 2e-6 (the ranks' counts differ little here) and fails this. Counts (tokens, routing
shares, exact match) must be equal.
"""

import math
import sys

import pytest

from h64lm.train.metrics import read_metrics
from tests.helpers import run_cli
from tests.train.test_stage import SFT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Cross-entropy and z-loss only: the Switch loss is a product of two batch means, not additive over
# ranks. Four held-out test problems keep the greedy exact-match pass short.
COMMON = SFT + ["model.router_aux_loss_coef=0", "stage.eval_examples=4"]
ONE = ["train.batch_size=1", "train.grad_accum=2", "hardware.num_threads=1"]
TWO = ["train.batch_size=1", "hardware.device=cpu", "hardware.precision=fp32"]
TIMING = {"step_time_s", "tokens_per_s", "mfu", "mem_gb"}  # wall-clock numbers, never equal
EXACT = ("tokens", "routing.", "sft/exact_match", "lr")  # counts and schedules: no rounding


def logged_numbers(record: dict, prefix: str = "") -> dict:
    """A metrics record -> {dotted name: number}, nested routing tables and lists included."""
    out = {}
    for key, value in record.items():
        name = prefix + str(key)
        if key in TIMING:
            continue
        if isinstance(value, dict):
            out.update(logged_numbers(value, name + "."))
        elif isinstance(value, list):
            out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def numbers_by_step(run_dir) -> dict[int, dict]:
    """{step: every logged number} of a run; a step logged again after a resume counts as logged last."""
    return {r["step"]: logged_numbers(r) for r in read_metrics(run_dir / "metrics.jsonl")}


def _train(tmp_path, name, extra, launcher=None) -> list[dict]:
    done = run_cli(COMMON + extra + [f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(tmp_path / name / "metrics.jsonl")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("sft_one"), "one", ONE)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["hardware=ddp"], ["hardware=fsdp"], ["hardware=ddp", "hardware.ep=2"]],
                         ids=["ddp", "fsdp", "ddp_ep2"])
def test_two_process_sft_layout_matches_one_process(tmp_path, one_process, layout):
    two = _train(tmp_path, "two", TWO + layout, launcher=TORCHRUN)
    assert [r["step"] for r in two] == [r["step"] for r in one_process] == list(range(1, 7))
    evaluated = [r for r in two if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    assert all(r["routing"] and "sft/exact_match" in r for r in evaluated)
    for a, b in zip(one_process, two):
        expected, got = logged_numbers(a), logged_numbers(b)
        assert got.keys() == expected.keys(), (b["step"], got.keys() ^ expected.keys())
        for name, value in expected.items():
            if name.startswith(EXACT) or not isinstance(value, float) or not math.isfinite(value):
                assert got[name] == value, (b["step"], name)
            else:
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (b["step"], name)
    assert any(k.endswith("top1_changed_from_start") for k in logged_numbers(evaluated[-1]))
