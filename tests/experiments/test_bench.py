"""The benchmark runs end to end at a toy size, its measuring helpers measure what they claim, and
the GPU correctness checks pass on the CPU paths. (The FLOPs helper's hand count lives in
tests/model/test_flops_init.py.) No timing asserts: speed is what the benchmark prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.bench import batch, bench_config, build_pair, main
from experiments.bench_correctness import check_logits, check_training
from experiments.bench_measure import alternate, step_peak_bytes, train_step
from h64lm.cpu_threads import SPINCOUNT
from h64lm.model import flops_per_token


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return main(["--smoke", "--profile", "--out", str(out)]), out


def test_benchmark_writes_consistent_results(smoke):
    results, out = smoke
    assert json.loads((out / "bench.json").read_text())["train"][0]["size"] == "smoke"
    train = results["train"][0]
    for name in ("ours", "hf"):
        r = train[name]
        assert r["tokens_per_s"] > 0
        assert r["peak_step_bytes"] > 0 and r["peak_forward_bytes"] > 0
        assert r["flops"] == pytest.approx(r["tokens_per_s"] * train["flops_per_token"])
        assert r["mfu"] == pytest.approx(r["flops"] / train["peak_flops"])
        assert train["profile"][name]["matrix products"] > 0
    assert train["flops_per_token"] == flops_per_token(bench_config("smoke"), train["seq_len"])
    assert train["ratio"] == pytest.approx(
        train["ours"]["tokens_per_s"] / train["hf"]["tokens_per_s"])
    experts = results["experts"]
    assert set(experts["tokens_per_s"]) == {"ours/4", "hf/4", "ours/8", "hf/8"}
    for name in ("ours", "hf"):  # the per-expert cost is the step-time slope between the counts
        step_s = experts["step_s"]
        assert experts["seconds_per_added_expert"][name] == pytest.approx(
            (step_s[f"{name}/8"] - step_s[f"{name}/4"]) / 4)
        assert experts["tokens_per_s"][f"{name}/8"] == pytest.approx(
            train["batch"] * train["seq_len"] / step_s[f"{name}/8"])
    # same weights, greedy: the two implementations decode the same tokens
    assert all(a == 1.0 for a in results["generate"]["greedy_agreement"].values())
    table = (out / "bench.md").read_text()
    for section in ("| smoke |", "Profile of one smoke", "Expert scaling", "Greedy generation"):
        assert section in table
    # the bench (or the caller) chose an OpenMP wait: it is recorded and printed
    wait = results["machine"]["omp_wait"]
    assert {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(wait)
    assert all(f"{k}={v}" in table for k, v in wait.items())
    for section in (train, results["experts"], results["generate"]):  # load before, after
        assert len(section["load_avg"]) == 2
    assert table.count("load average") == 4  # the machine, the MFU peak, experts, generation


def test_bench_shortens_openmp_spin_before_torch_starts():
    # a fresh interpreter without any wait setting: importing the bench sets run.py's spin count
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, experiments.bench; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split()[-1] == SPINCOUNT


@pytest.mark.parametrize("hf", [False, True])
def test_frozen_pair_steps_route_alike_while_adamw_runs(hf):
    cfg = bench_config("smoke", num_experts=8)
    ours, hf_model, opt_ours, opt_hf = build_pair(cfg, torch.device("cpu"), False, frozen=True)
    model, opt = (hf_model, opt_hf) if hf else (ours, opt_ours)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(cfg, 2, 16, torch.device("cpu"))
    step = train_step(model, opt, x, y, hf=hf, dtype=torch.float32)
    step()
    step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the optimizer did its work (moments updated), only the step size is zero
    assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in model.parameters()
               if p.grad is None and p in opt.state and p.dim() > 1)
    assert sum(int(opt.state[p]["step"]) for p in opt.state) == 2 * len(opt.state) > 0


def test_alternate_interleaves_candidates_after_warmup():
    calls = []
    medians = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        warmup=1, rounds=3, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(s >= 0 for s in medians.values())


def test_step_peak_bytes_sees_a_transient_allocation():
    size = 4 * 2**20  # two live 4 MiB buffers at the peak, none left afterwards

    def fn():
        a = torch.ones(size // 4)
        b = a * 2
        return float(b[0])

    peak = step_peak_bytes(fn, torch.device("cpu"))
    assert 2 * size <= peak < 3 * size


def test_correctness_checks_pass_on_cpu():
    logits = check_logits("smoke", torch.device("cpu"))
    assert all(r["ok"] for r in logits), logits
    run = check_training("smoke", torch.device("cpu"), compile_model=False, steps=20, lr=1e-2)
    assert run["ok"], run
