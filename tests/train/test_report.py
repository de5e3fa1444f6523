"""The trainer's step record and run summary, against hand-computed values on a stand-in trainer."""

import math
from types import SimpleNamespace

import pytest
import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM, active_parameters_per_token, count_parameters
from h64lm.train.metrics import History
from h64lm.train.report import announcement, run_summary, step_record
from h64lm.train.step import LayerLoad, StepStats


def _trainer(**history):
    config = H64LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                         intermediate_size=64, moe_intermediate_size=32, num_experts=4, moe_layers="all")
    return SimpleNamespace(step=7, tokens_seen=7 * 512, accum=2, skipped_steps=1, peak=1e12,
                           flops_per_token=3e6, d=SimpleNamespace(device=torch.device("cpu"), world_size=1,
                                                                  enabled=False),
                           model=H64LMForCausalLM(config),
                           run=SimpleNamespace(model=config, train=SimpleNamespace(batch_size=4)),
                           precision=SimpleNamespace(name="fp32"), history=History(history))


def test_step_record_rates_and_router_loads():
    stats = StepStats(terms={"loss": 2.5, "ce": 2.0}, nonfinite=False, stop_requested=False,
                      router={1: LayerLoad(load=[0.5, 0.25, 0.125, 0.125], dropped=0.0)}, grad_norm=0.5, lr=1e-3,
                      tokens=512)
    record = step_record(_trainer(), stats, elapsed=0.25)
    assert list(record)[:4] == ["step", "tokens", "loss", "ce"]  # loss first, then each term
    assert record["tokens_per_s"] == 2048.0 and record["mfu"] == pytest.approx(3e6 * 2048 / 1e12)
    assert record["router"] == {"1": {"load": [0.5, 0.25, 0.125, 0.125], "dropped": 0.0,
                                      "load_max_over_mean": 2.0}}  # 0.5 against a mean of 0.25
    assert record["mem_gb"] > 0


def test_summary_and_announcement():
    trainer = _trainer(val_loss=[3.0, 2.0, 2.5], val_ppl=[math.exp(3.0), math.exp(2.0), math.exp(2.5)])
    summary = run_summary(trainer)
    assert (summary["best_val_loss"], summary["first_val_loss"], summary["final_val_loss"]) == (2.0, 3.0, 2.5)
    assert summary["best_val_ppl"] == pytest.approx(math.exp(2.0))
    assert summary["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert summary["parameters"] > summary["active_parameters"]  # top-2 of 4 experts
    assert run_summary(_trainer())["final_val_loss"] is None  # no evaluation yet
    line = announcement(trainer)
    assert f"{count_parameters(trainer.model) / 1e6:.2f}M parameters" in line
    assert f"{active_parameters_per_token(trainer.run.model) / 1e6:.2f}M active" in line
    assert line.endswith("2 micro-batch(es) of train.batch_size=4 per step on 1 process(es), fp32 on cpu")
